// UblkDevice: a /dev/ublkbN served by native queue threads through a block
// target. Requests the target cannot plan arrive here (the slow path) in
// batches and are answered through `onSlow`.
import * as fs from 'fs';
import * as os from 'os';
import { ublkAddon, UBLK_OP, type NativeUblkDevice, type NativeDeviceInfo, type NativeSlowRequest, type TargetObject } from './native';
import { fromNative, UblkError } from './errors';

export type SlowOp = 'read' | 'write' | 'flush' | 'discard' | 'write-zeroes' | 'other';

export interface SlowRequest {
  op: SlowOp;
  /** The raw UBLK_IO_OP_* code. */
  opcode: number;
  offset: number;
  length: number;
  fua: boolean;
  queue: number;
  tag: number;
  /** WRITE: the data (a private copy). */
  data?: Buffer;
}

/**
 * Answers one slow request: a READ returns its bytes (shorter reads as
 * zeros); anything else returns nothing. Throwing an error with a numeric
 * `errno` (e.g. a StrataError) fails the request with that errno, else EIO.
 */
export type SlowHandler = (req: SlowRequest) => Promise<Uint8Array | void> | Uint8Array | void;

export type Transport = 'zero-copy' | 'user-copy';

export interface UblkCreateOptions {
  /** A native block target ({ handle }, e.g. FileTarget or the engine's DeviceTarget). */
  target: TargetObject & { serveSlow?: SlowHandler };
  /** Bytes; default: the target's size. */
  size?: number;
  queues?: number;
  depth?: number;
  /** Largest request in bytes (max_io_buf_bytes). */
  maxIo?: number;
  /** Default: $STRATA_UBLK_TRANSPORT, else the best the kernel offers. */
  transport?: Transport | 'auto';
  /**
   * UBLK_F_USER_RECOVERY: the device survives its server dying and another
   * process can recover() it. true: requests the dead server had already
   * received fail; 'reissue': they are re-sent to the new server (targets
   * must tolerate a repeated write); 'fail-io': all I/O fails until recovery.
   */
  recovery?: boolean | 'reissue' | 'fail-io';
  /** Send every request to `onSlow` (tests of the slow path). */
  alwaysSlow?: boolean;
  /** Let the kernel scan partitions at start (default off where the kernel allows). */
  partScan?: boolean;
  /** Slow-path handler; default: target.serveSlow, else EIO. */
  onSlow?: SlowHandler;
  /**
   * Tags the kernel device as strata's, with this 32-bit owner id (see
   * ownerId()), so a later process can find the devices a dead one left.
   */
  owner?: number;
  /**
   * The block layer's request timeout for the device, in ms (default
   * 2000; 0 leaves the kernel's 30 s). See REQUEST_TIMEOUT_MS.
   */
  requestTimeoutMs?: number;
}

/**
 * Why strata shortens the request timeout: a 6.12 kernel notices that a
 * server died while holding every tag of a queue (all requests at the server,
 * no fetch left to cancel) only when one of those requests times out, so a
 * device waited the default 30 s before it could be recovered (measured
 * 29–31 s; under 2 s with this timeout: test/vm/ublk-recovery.ts). ublk's
 * timeout handler only re-arms the timer while the server lives (we never
 * set UNPRIVILEGED_DEV, whose handler kills it), so a short timeout costs a
 * live device nothing. 7.x kernels detect the exit
 * when the char device is released and do not need it.
 */
const REQUEST_TIMEOUT_MS = 2000;

const OPS: Record<number, SlowOp> = {
  [UBLK_OP.READ]: 'read', [UBLK_OP.WRITE]: 'write', [UBLK_OP.FLUSH]: 'flush',
  [UBLK_OP.DISCARD]: 'discard', [UBLK_OP.WRITE_ZEROES]: 'write-zeroes',
};
const EIO = os.constants.errno.EIO;

/** Live devices, so a served device is never garbage collected. */
const live = new Set<UblkDevice>();

export function transportFromEnv(): Transport | 'auto' {
  // An empty variable means "not set" (CI matrices set it to '').
  const v = (process.env.STRATA_UBLK_TRANSPORT ?? '').trim();
  if (v === '' || v === 'auto') return 'auto';
  if (v === 'zero-copy' || v === 'user-copy') return v;
  throw new UblkError(os.constants.errno.EINVAL, 'STRATA_UBLK_TRANSPORT', `STRATA_UBLK_TRANSPORT must be zero-copy or user-copy, not ${v}`);
}

export class UblkDevice {
  /** Kernel device id N. */
  readonly id: number;
  /** /dev/ublkbN */
  readonly path: string;
  readonly transport: Transport;
  readonly info: NativeDeviceInfo;
  /** The request timeout the device runs with (ms), or null if it could not be set (no writable sysfs). */
  requestTimeoutMs: number | null = null;
  private deleted = false;

  private constructor(private readonly native: NativeUblkDevice, info: NativeDeviceInfo, private readonly handler: SlowHandler) {
    this.info = info;
    this.id = info.id;
    this.path = `/dev/ublkb${info.id}`;
    this.transport = info.transport;
  }

  static async create(opts: UblkCreateOptions): Promise<UblkDevice> {
    const transport = opts.transport ?? transportFromEnv();
    return UblkDevice.launch(opts, (n) => n.start(), {
      size: opts.size, queues: opts.queues, depth: opts.depth, maxIo: opts.maxIo, transport,
      recovery: opts.recovery, alwaysSlow: opts.alwaysSlow, partScan: opts.partScan, owner: opts.owner,
    });
  }

  /**
   * Takes over device `id` whose server died (created with `recovery`):
   * START_USER_RECOVERY, fetch every tag, END_USER_RECOVERY.
   */
  static async recover(id: number, opts: Pick<UblkCreateOptions, 'target' | 'onSlow' | 'alwaysSlow' | 'requestTimeoutMs'>): Promise<UblkDevice> {
    return UblkDevice.launch(opts, (n) => n.recover(id), { alwaysSlow: opts.alwaysSlow });
  }

  private static async launch(opts: Pick<UblkCreateOptions, 'target' | 'onSlow' | 'requestTimeoutMs'>,
    go: (n: NativeUblkDevice) => Promise<NativeDeviceInfo>, nopts: object): Promise<UblkDevice> {
    const timeout = opts.requestTimeoutMs ?? REQUEST_TIMEOUT_MS;
    if (!Number.isInteger(timeout) || timeout < 0) {
      throw new UblkError(os.constants.errno.EINVAL, 'requestTimeoutMs', `requestTimeoutMs must be a whole number of ms >= 0, not ${opts.requestTimeoutMs}`);
    }
    const handler: SlowHandler = opts.onSlow ?? opts.target.serveSlow?.bind(opts.target) ??
      (() => { throw new UblkError(EIO, 'slow path', 'target cannot plan this request and no onSlow handler was given'); });
    let dev: UblkDevice | undefined;
    let native: NativeUblkDevice;
    try {
      // Slow requests can arrive before start() resolves (START_DEV's own
      // reads, e.g. a partition scan): serve them as soon as they come.
      native = new (ublkAddon().UblkDevice)(opts.target, nopts, () => {
        if (dev) dev.pump();
        else for (const r of native.drain()) serve(native, handler, r);
      });
    } catch (e) {
      throw fromNative(e, 'UblkDevice');
    }
    let info: NativeDeviceInfo;
    try {
      info = await go(native);
    } catch (e) {
      throw fromNative(e, 'create');
    }
    dev = new UblkDevice(native, info, handler);
    live.add(dev);
    dev.pump();
    dev.requestTimeoutMs = setRequestTimeout(info.id, timeout);
    return dev;
  }

  private pump(): void {
    for (const r of this.native.drain()) serve(this.native, this.handler, r);
  }

  /** STOP_DEV (or, with `try`, TRY_STOP_DEV: EBUSY while the device is open; kernel >= 7.0). */
  async stop(opts: { try?: boolean } = {}): Promise<void> {
    try {
      await this.native.stop(opts);
    } catch (e) {
      throw fromNative(e, 'stop');
    }
  }

  /**
   * Stops (if needed), ends the queue threads and deletes the kernel device
   * (DEL_DEV_ASYNC: returns even while something still holds /dev/ublkbN
   * open; the id is freed when the last opener closes).
   */
  async delete(): Promise<void> {
    if (this.deleted) return;
    try {
      await this.native.delete();
      this.deleted = true;
    } catch (e) {
      throw fromNative(e, 'delete');
    } finally {
      if (this.deleted) live.delete(this);
    }
  }

  /** Ends this process's service without stopping the device (a recovery device goes QUIESCED). */
  async abandon(): Promise<void> {
    await this.native.abandon();
    this.deleted = true;
    live.delete(this);
  }

  stats(): { fastIos: number; slowIos: number; waits: number; cqes: number; state: string } {
    return this.native.stats();
  }
}

/** Sets /sys/block/ublkbN/queue/io_timeout (0: keep the kernel's); the timeout in force, or null if sysfs refused. */
function setRequestTimeout(id: number, ms: number): number | null {
  const file = `/sys/block/ublkb${id}/queue/io_timeout`;
  try {
    if (ms > 0) fs.writeFileSync(file, String(ms));
    return Number(fs.readFileSync(file, 'utf8').trim());
  } catch {
    return null; // a read-only /sys (some containers): the kernel's timeout stays
  }
}

function serve(native: NativeUblkDevice, handler: SlowHandler, r: NativeSlowRequest): void {
  const req: SlowRequest = {
    op: OPS[r.op] ?? 'other', opcode: r.op, offset: r.offset, length: r.length, fua: r.fua,
    queue: r.queue, tag: r.tag, data: r.data,
  };
  let p: Promise<Uint8Array | void>;
  try {
    p = Promise.resolve(handler(req));
  } catch (e) {
    p = Promise.reject(e);
  }
  p.then((data) => {
    const ok = req.op === 'read' || req.op === 'write' ? req.length : 0;
    native.complete(r.queue, r.tag, ok, req.op === 'read' && data ? data : undefined);
  }, (e) => {
    const errno = typeof (e as { errno?: unknown })?.errno === 'number' ? Math.abs((e as { errno: number }).errno) : EIO;
    native.complete(r.queue, r.tag, -(errno || EIO));
  }).catch((e) => process.emitWarning(`ublk slow-path completion failed: ${(e as Error).message}`));
}
