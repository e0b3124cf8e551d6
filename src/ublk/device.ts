// UblkDevice: a /dev/ublkbN whose queues the I/O workers' rings serve
// (src/ublk/queue.ts): READs and WRITEs they can place with the engine's
// planner (a strata device: `io`) or a file's 1:1 mapping (a FileTarget)
// complete there; everything else arrives here (the slow path) and is
// answered through `onSlow`. The addon only adds, starts, stops and deletes
// the kernel device (native/ublk.cc).
import * as fs from 'fs';
import * as os from 'os';
import { ublkAddon, UBLK_OP, type NativeUblkDevice, type NativeDeviceInfo } from './native';
import { fromNative, UblkError } from './errors';
import { UBLK_STAT, type UblkQueueEvent, type UblkSlowRequest } from './queue';
import { IoWorkers, type OpenChannel } from '../io/pool';
import { SharedHeap } from '../wasm';
import { FileTarget } from './file-target';
import { features } from './features';

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
  /** A file the device maps 1:1 (its slow path: target.serveSlow unless onSlow is given). */
  target?: FileTarget;
  /** Or a strata device: the engine's I/O workers and its gate record (Device.ioTarget()). */
  io?: { workers: IoWorkers; gate: number };
  /** Bytes; default: the file target's size (required with `io`). */
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
  /** Its queues on the I/O workers. */
  private queues: WorkerQueues | null = null;

  private constructor(private readonly native: NativeUblkDevice, info: NativeDeviceInfo, readonly handler: SlowHandler) {
    this.info = info;
    this.id = info.id;
    this.path = `/dev/ublkb${info.id}`;
    this.transport = info.transport;
  }

  static async create(opts: UblkCreateOptions): Promise<UblkDevice> {
    let transport = opts.transport ?? transportFromEnv();
    // Zero copy needs a slot of a worker ring's sparse table per tag: when
    // the workers have none left, 'auto' takes user copy.
    // Every fetched tag stays in flight on a worker's ring, and under zero
    // copy has a slot of its sparse table: the workers must have room for
    // them before the kernel device exists ('auto' takes user copy when
    // only that fits).
    const f = (() => { try { return features(); } catch { return null; } })();
    const workers = f ? opts.io?.workers ?? (opts.target ? fileWorkers() : null) : null;
    if (workers) {
      await workers.ready;
      const queues = opts.queues ?? 1, depth = opts.depth ?? 64;
      const zc = transport === 'zero-copy' || (transport === 'auto' && f!.zeroCopy);
      if (zc && transport === 'auto' && !workers.ublkRoom(queues, depth, true)) transport = 'user-copy';
      if (!workers.ublkRoom(queues, depth, transport !== 'user-copy')) {
        throw new UblkError(os.constants.errno.ENOSPC, 'UblkDevice', `the I/O workers have no room for ${queues} more queue(s) of ${depth} tags${transport === 'zero-copy' ? ' with zero-copy buffer slots' : ''} (use fewer tags${transport === 'zero-copy' ? ', user copy' : ''} or more workers)`);
      }
    }
    const size = opts.size ?? opts.target?.size;
    return UblkDevice.launch(opts, size, (n) => n.start(), {
      size, queues: opts.queues, depth: opts.depth, maxIo: opts.maxIo, transport,
      recovery: opts.recovery, partScan: opts.partScan, owner: opts.owner,
    });
  }

  /**
   * Takes over device `id` whose server died (created with `recovery`):
   * START_USER_RECOVERY, fetch every tag, END_USER_RECOVERY.
   */
  static async recover(id: number, opts: Pick<UblkCreateOptions, 'target' | 'io' | 'size' | 'onSlow' | 'alwaysSlow' | 'requestTimeoutMs'>): Promise<UblkDevice> {
    return UblkDevice.launch(opts, opts.size ?? opts.target?.size, (n) => n.recover(id), {});
  }

  private static async launch(opts: Pick<UblkCreateOptions, 'target' | 'io' | 'onSlow' | 'alwaysSlow' | 'requestTimeoutMs'>, size: number | undefined,
    go: (n: NativeUblkDevice) => Promise<NativeDeviceInfo>, nopts: object): Promise<UblkDevice> {
    const timeout = opts.requestTimeoutMs ?? REQUEST_TIMEOUT_MS;
    if (!Number.isInteger(timeout) || timeout < 0) {
      throw new UblkError(os.constants.errno.EINVAL, 'requestTimeoutMs', `requestTimeoutMs must be a whole number of ms >= 0, not ${opts.requestTimeoutMs}`);
    }
    if (!opts.io && !(opts.target instanceof FileTarget)) throw new UblkError(os.constants.errno.EINVAL, 'UblkDevice', 'a device needs a FileTarget or an engine device (io)');
    if (opts.target?.closed) throw new UblkError(os.constants.errno.EBADF, 'UblkDevice', 'the file target is closed');
    const handler: SlowHandler = opts.onSlow ?? (opts.target ? (r) => opts.target!.serveSlow(r) :
      () => { throw new UblkError(EIO, 'slow path', 'no onSlow handler was given'); });
    let native: NativeUblkDevice;
    try {
      native = new (ublkAddon().UblkDevice)(nopts);
    } catch (e) {
      throw fromNative(e, 'UblkDevice');
    }
    const t0 = performance.now();
    let info: NativeDeviceInfo;
    try {
      info = await go(native);
    } catch (e) {
      throw fromNative(e, 'create');
    }
    const dev = new UblkDevice(native, info, handler);
    try {
      dev.queues = await WorkerQueues.start(native, info, opts, handler, size ?? 0);
    } catch (e) {
      await native.delete().catch(() => undefined);
      throw fromNative(e, 'ublk queues on the I/O workers');
    }
    if (info.createMs) info.createMs = performance.now() - t0;
    live.add(dev);
    dev.requestTimeoutMs = setRequestTimeout(info.id, timeout);
    return dev;
  }

  /** STOP_DEV (or, with `try`, TRY_STOP_DEV: EBUSY while the device is open; kernel >= 7.0). */
  async stop(opts: { try?: boolean } = {}): Promise<void> {
    try {
      await this.native.stop(opts);
    } catch (e) {
      throw fromNative(e, 'stop');
    }
    // STOP_DEV aborts every fetched tag: the workers let the queues go.
    await this.queues?.closed();
  }

  /**
   * Stops (if needed), waits for the workers to let the queues go and deletes the kernel device
   * (DEL_DEV_ASYNC: returns even while something still holds /dev/ublkbN
   * open; the id is freed when the last opener closes).
   */
  async delete(): Promise<void> {
    if (this.deleted) return;
    try {
      await this.stop();
      await this.native.delete();
      this.queues?.release();
      this.deleted = true;
    } catch (e) {
      throw fromNative(e, 'delete');
    } finally {
      if (this.deleted) live.delete(this);
    }
  }

  /**
   * Ends this process's service without stopping the device: a recovery
   * device goes QUIESCED once the kernel sees its server gone, which is when
   * this process's rings let the queues' commands go: at exit.
   */
  async abandon(): Promise<void> {
    this.queues?.drop();
    await this.native.abandon();
    this.deleted = true;
    live.delete(this);
  }

  /**
   * Requests the workers served, those that came to the slow path (of them
   * READs and WRITEs the workers could not place, FUA aside: slowReadWrites),
   * and the kernel device's state as this object knows it.
   */
  stats(): { fastIos: number; slowIos: number; slowReadWrites: number; state: string } {
    return { ...this.native.stats(), ...(this.queues?.stats() ?? { fastIos: 0, slowIos: 0, slowReadWrites: 0 }) };
  }
}

/**
 * The queues of one device on the I/O workers: each is a channel of the
 * least busy worker (src/ublk/queue.ts). The main thread opens /dev/ublkcN
 * once (the kernel allows one opener); the workers use that descriptor.
 */
class WorkerQueues {
  private readonly channels: OpenChannel[] = [];
  private readonly stats_: Float64Array[] = [];
  private open = 0;
  private readonly gone: Array<() => void> = [];
  private readonly fua: number;

  private constructor(private readonly cdev: number, private readonly file: number) { this.fua = ublkAddon().ublkUapi.ioFlagFua; }

  /** Opens the char device (and a file target's own descriptor), has every queue's tags fetched, then START_DEV. */
  static async start(native: NativeUblkDevice, info: NativeDeviceInfo, opts: Pick<UblkCreateOptions, 'target' | 'io' | 'alwaysSlow'>,
    handler: SlowHandler, size: number): Promise<WorkerQueues> {
    const workers = opts.io?.workers ?? fileWorkers();
    let t = performance.now();
    const lap = () => { const n = performance.now(), d = n - t; t = n; return d; };
    const cdev = await openCdev(info.id);
    // The device's own descriptor of a file target: a target closed early cannot leave its number to another file.
    const file = opts.target ? fs.openSync(opts.target.path, 'r+') : -1;
    const wq = new WorkerQueues(cdev, file);
    info.createSteps.openCdev = lap();
    const alwaysSlow = !!opts.alwaysSlow || !!opts.target?.alwaysSlow;
    let failed: string | null = null;
    let fetched = 0;
    let onFetched = () => {};
    await workers.ready;
    try {
      for (let q = 0; q < info.queues; q++) {
        const stats = new SharedArrayBuffer(UBLK_STAT.LENGTH * 8);
        wq.stats_.push(new Float64Array(stats));
        wq.open++;
        const spec = { cdev, queue: q, depth: info.depth, maxIo: info.maxIo, zeroCopy: info.transport === 'zero-copy',
          size: size || Number.MAX_SAFE_INTEGER /* unknown: the kernel bounds requests by the device anyway */, alwaysSlow, file };
        const ch: OpenChannel = workers.openUblk(spec, opts.io?.gate ?? 0, stats, (e: UblkQueueEvent) => {
          if (e.t === 'ublk-fetched') fetched++;
          else if (e.t === 'ublk-requests') for (const r of e.reqs) wq.serve(ch, handler, q, r);
          else {
            if (fetched < info.queues) failed ??= e.reason;
            if (--wq.open === 0) for (const g of wq.gone.splice(0)) g();
          }
          onFetched();
        });
        wq.channels.push(ch);
      }
    } catch (e) {
      // No worker could take a queue (zero-copy slots): the ones opened go.
      wq.drop();
      wq.release();
      throw fromNative(e, 'ublk queue');
    }
    await new Promise<void>((resolve) => { onFetched = () => { if (fetched === info.queues || failed) resolve(); }; onFetched(); });
    info.createSteps.queuesReady = lap();
    try {
      if (failed) throw new UblkError(EIO, 'ublk queue', `an I/O worker could not serve the device's queues: ${failed}`);
      // START_DEV (or END_USER_RECOVERY) once every tag is fetched.
      await native.startDev();
    } catch (e) {
      wq.drop();
      wq.release();
      throw e;
    }
    info.createSteps.startDev = lap();
    return wq;
  }

  private serve(ch: OpenChannel, handler: SlowHandler, queue: number, r: UblkSlowRequest): void {
    const req: SlowRequest = {
      op: OPS[r.op] ?? 'other', opcode: r.op, offset: r.offset, length: r.length, fua: (r.flags & this.fua) !== 0,
      queue, tag: r.tag, data: r.data ? Buffer.from(r.data.buffer, r.data.byteOffset, r.data.byteLength) : undefined,
    };
    answer(handler, req, (result, data) => {
      // A view of a larger buffer would be cloned whole into the message: only its bytes go.
      const own = data && data.byteLength !== data.buffer.byteLength ? Uint8Array.prototype.slice.call(data) : data;
      ch.send({ t: 'ublk-answer', id: ch.id, tag: r.tag, result, data: own ?? null });
    });
  }

  /** Resolves once every queue's channel closed (the kernel aborted its tags, or it was dropped). */
  closed(): Promise<void> {
    return this.open === 0 ? Promise.resolve() : new Promise((r) => this.gone.push(r));
  }

  /** Stops serving at once (abandon). */
  drop(): void { for (const ch of this.channels) ch.send({ t: 'ublk-drop', id: ch.id }); }

  /** After DEL_DEV: the char device's descriptor (and the file's). */
  release(): void {
    fs.closeSync(this.cdev);
    if (this.file >= 0) fs.closeSync(this.file);
  }

  stats(): { fastIos: number; slowIos: number; slowReadWrites: number } {
    let fastIos = 0, slowIos = 0, slowReadWrites = 0;
    for (const s of this.stats_) { fastIos += s[UBLK_STAT.FAST]; slowIos += s[UBLK_STAT.SLOW]; slowReadWrites += s[UBLK_STAT.SLOW_RW]; }
    return { fastIos, slowIos, slowReadWrites };
  }
}

let fileIo: IoWorkers | null = null;
/** I/O workers for FileTarget devices (started by the first one; no engine: their shared memory only holds the planner's scratch). */
function fileWorkers(): IoWorkers {
  fileIo ??= new IoWorkers(new SharedHeap({ reserveBytes: 1 << 16 }));
  return fileIo;
}

/** Opens /dev/ublkcN; devtmpfs creates it with the device, udev may still be adjusting it: retried briefly. */
async function openCdev(id: number): Promise<number> {
  for (let i = 0; ; i++) {
    try {
      return fs.openSync(`/dev/ublkc${id}`, 'r+');
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (i >= 300 || (code !== 'ENOENT' && code !== 'EACCES' && code !== 'EPERM')) throw e;
      await new Promise((r) => setTimeout(r, 10));
    }
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

/** Runs the slow-path handler for one request and gives `done` its result (bytes, 0 or -errno) and a READ's data. */
function answer(handler: SlowHandler, req: SlowRequest, done: (result: number, data?: Uint8Array) => void): void {
  let p: Promise<Uint8Array | void>;
  try {
    p = Promise.resolve(handler(req));
  } catch (e) {
    p = Promise.reject(e);
  }
  p.then((data) => {
    const ok = req.op === 'read' || req.op === 'write' ? req.length : 0;
    done(ok, req.op === 'read' && data ? data : undefined);
  }, (e) => {
    const errno = typeof (e as { errno?: unknown })?.errno === 'number' ? Math.abs((e as { errno: number }).errno) : EIO;
    done(-(errno || EIO));
  }).catch((e) => process.emitWarning(`ublk slow-path completion failed: ${(e as Error).message}`));
}
