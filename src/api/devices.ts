// The daemon's devices: each is an engine device plus the frontend that
// serves it. NBD exports are named by device id; the kernel-facing ublk
// frontend plugs in through `Frontends`. One owner for create/delete so the
// HTTP API and the NBD export resolver always agree on what exists.
import { randomBytes } from 'crypto';
import type { Engine } from '../engine';
import type { Device } from '../device';
import type { NbdExport } from '../nbd/export';
import { deviceExport } from '../nbd-export';
import { StrataError } from '../errors';
import { traced } from '../tracing';

export type Frontend = 'nbd' | 'ublk';

/** What the daemon can attach a device to. */
export interface Frontends {
  nbd: { socket: string; tcp?: { host: string; port: number }; dropExport(exp: NbdExport): void };
  /** Present when ublk works on this host. */
  ublk?: {
    /** A new /dev/ublkbN for the device (its kernel id is kept in the device's meta). */
    attach(dev: Device): Promise<UblkAttachment>;
    /** Takes over the kernel device a previous process left for recovery; null when it is gone. */
    recover(id: number, dev: Device): Promise<UblkAttachment | null>;
  };
}

export interface UblkAttachment {
  id: number;
  path: string;
  /** Removes the kernel device. */
  detach(): Promise<void>;
  /** Leaves the kernel device waiting for a new server (USER_RECOVERY). */
  abandon(): Promise<void>;
}

export interface ManagedDevice {
  id: string;
  dev: Device;
  frontend: Frontend;
  exp: NbdExport;
  created: string;
  ublk?: UblkAttachment;
  /** Opened by naming `<layer>/<name>` over NBD rather than through the API. */
  byName: boolean;
  /** The TLS identity it is served to over TCP (undefined: any client the server accepts). */
  client?: string;
}

export const DEVICE_ID_RE = /^[A-Za-z0-9_-]{1,64}$/;

/** What a TLS identity (PSK identity, certificate common name) may look like. */
export const CLIENT_RE = /^[A-Za-z0-9._@-]{1,128}$/;

export interface CreateOptions {
  id?: string; frontend?: Frontend | 'auto'; byName?: boolean;
  /** Only this TLS identity may open the device over TCP (unix-socket clients are local and may). */
  client?: string;
}

export class DeviceManager {
  private devices = new Map<string, ManagedDevice>();
  private pending = new Set<string>();

  /** Metrics hooks (lifecycle latency, engine-path request latency). */
  observe = { lifecycle: (_op: 'create' | 'delete', _s: number): void => {}, io: (_op: string, _s: number): void => {} };

  constructor(private readonly engine: Engine, private readonly frontends: Frontends, private readonly maxDevices = 1024,
    /** The frontend of a device created without naming one. */
    readonly defaultFrontend: Frontend | 'auto' = 'auto') {}

  get size(): number { return this.devices.size; }
  get(id: string): ManagedDevice | undefined { return this.devices.get(id); }
  list(): ManagedDevice[] { return [...this.devices.values()]; }

  /** The frontend `auto` resolves to on this host. */
  resolveFrontend(want: Frontend | 'auto'): Frontend {
    if (want === 'auto') return this.frontends.ublk ? 'ublk' : 'nbd';
    if (want === 'ublk' && !this.frontends.ublk) {
      throw new StrataError('ENOTSUP', 'ublk is not available on this host (no usable /dev/ublk-control); use frontend "nbd"');
    }
    return want;
  }

  create(layer: string, opts: CreateOptions = {}): Promise<ManagedDevice> {
    return traced('strata.device.create', { 'strata.layer': layer, 'strata.device': opts.id ?? '' }, () => this.createUntraced(layer, opts));
  }

  private async createUntraced(layer: string, opts: CreateOptions): Promise<ManagedDevice> {
    const frontend = this.resolveFrontend(opts.frontend ?? this.defaultFrontend);
    const id = opts.id ?? randomBytes(6).toString('hex');
    if (!DEVICE_ID_RE.test(id)) throw new StrataError('EINVAL', `invalid device id ${JSON.stringify(id)}`);
    if (this.devices.has(id) || this.pending.has(id)) throw new StrataError('EEXIST', `device ${id} exists`);
    if (this.devices.size + this.pending.size >= this.maxDevices) throw new StrataError('ENOSPC', `device limit (${this.maxDevices}) reached`);
    this.pending.add(id);
    const t0 = performance.now();
    try {
      const created = new Date().toISOString();
      // Durable: a daemon restart (or crash) finds the device and its writes again.
      const byName = !!opts.byName;
      const client = opts.client;
      if (client !== undefined && !CLIENT_RE.test(client)) throw new StrataError('EINVAL', `invalid client identity ${JSON.stringify(client)}`);
      const dev = await this.engine.openDevice(layer, { id, durable: true, meta: { frontend, created, ...(byName ? { byName } : {}), ...(client ? { client } : {}) } });
      const m: ManagedDevice = { id, dev, frontend, exp: this.timed(deviceExport(dev)), created, byName, client };
      if (frontend === 'ublk') {
        try { m.ublk = await this.frontends.ublk!.attach(dev); } catch (e) { await this.engine.closeDevice(dev); throw e; }
        dev.updateMeta({ ublkId: m.ublk.id });
      }
      this.devices.set(id, m);
      this.observe.lifecycle('create', (performance.now() - t0) / 1000);
      return m;
    } finally { this.pending.delete(id); }
  }

  /** The export with its engine-path requests timed (native ones never come here). */
  private timed(exp: NbdExport): NbdExport {
    const wrap = <A extends unknown[], R>(op: string, fn: (...a: A) => Promise<R>) => async (...a: A): Promise<R> => {
      const t0 = performance.now();
      try { return await fn(...a); } finally { this.observe.io(op, (performance.now() - t0) / 1000); }
    };
    return {
      ...exp,
      get size() { return exp.size; },
      read: wrap('read', exp.read), readView: exp.readView && wrap('read', exp.readView), write: wrap('write', exp.write),
      flush: wrap('flush', exp.flush), trim: wrap('trim', exp.trim), writeZeroes: wrap('write_zeroes', exp.writeZeroes),
      cache: wrap('cache', exp.cache),
    };
  }

  /**
   * Brings back every device a previous daemon process left (after a clean
   * stop or a crash). One that cannot be resumed is reported and left on
   * disk, never deleted.
   */
  async restore(onError: (id: string, e: Error) => void): Promise<ManagedDevice[]> {
    const out: ManagedDevice[] = [];
    for (const id of this.engine.savedDevices()) {
      try {
        const dev = await this.engine.resumeDevice(id);
        const meta = dev.meta ?? {};
        let frontend: Frontend = meta.frontend === 'ublk' ? 'ublk' : 'nbd';
        const m: ManagedDevice = {
          id, dev, frontend, exp: this.timed(deviceExport(dev)), created: String(meta.created ?? new Date().toISOString()),
          byName: meta.byName === true, client: typeof meta.client === 'string' ? meta.client : undefined,
        };
        if (frontend === 'ublk') {
          const u = this.frontends.ublk;
          if (u) {
            // The kernel device a previous process left (USER_RECOVERY), else a new one.
            const old = typeof meta.ublkId === 'number' ? await u.recover(meta.ublkId, dev) : null;
            m.ublk = old ?? await u.attach(dev);
            dev.updateMeta({ ublkId: m.ublk.id });
          } else frontend = m.frontend = 'nbd'; // ublk gone on this host: still reachable over NBD
        }
        this.devices.set(id, m);
        out.push(m);
      } catch (e) { onError(id, e as Error); }
    }
    return out;
  }

  /** Detaches the frontend (NBD clients of it are disconnected), then drops the device. */
  delete(id: string): Promise<void> {
    return traced('strata.device.delete', { 'strata.device': id }, () => this.deleteUntraced(id));
  }

  private async deleteUntraced(id: string): Promise<void> {
    const m = this.devices.get(id);
    if (!m) throw new StrataError('ENOENT', `no device ${id}`);
    const t0 = performance.now();
    this.devices.delete(id);
    this.frontends.nbd.dropExport(m.exp);
    if (m.ublk) await m.ublk.detach();
    await this.engine.closeDevice(m.dev);
    this.observe.lifecycle('delete', (performance.now() - t0) / 1000);
  }

  /** Shutdown: ublk devices are left recoverable or removed (devices themselves stay durable). */
  async releaseUblk(mode: 'keep' | 'remove'): Promise<void> {
    await Promise.all(this.list().filter((m) => m.ublk).map((m) => (mode === 'keep' ? m.ublk!.abandon() : m.ublk!.detach())));
  }

  /** Flushes every device (shutdown). */
  async flushAll(): Promise<void> {
    await Promise.all(this.list().map((m) => m.dev.flush()));
  }

  describe(m: ManagedDevice) {
    const { socket, tcp } = this.frontends.nbd;
    return {
      id: m.id, layer: m.dev.layerId, size: m.dev.size, frontend: m.frontend, created: m.created,
      path: m.ublk?.path ?? null, client: m.client ?? null,
      nbd: {
        export: m.id, socket,
        uri: `nbd+unix:///${m.id}?socket=${socket}`,
        ...(tcp ? { tcpUri: `nbd://${tcp.host.includes(':') ? `[${tcp.host}]` : tcp.host}:${tcp.port}/${m.id}` } : {}),
      },
      stats: { ...m.dev.stats, native: m.dev.nativeStats() },
    };
  }
}
