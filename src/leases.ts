// Leases: how hosts sharing one object store tell each other which layers
// they use, with nothing but the store (docs/architecture.md, "Many hosts").
// Each host keeps one object, `leases/<host>`, naming the layers its devices
// read through; it rewrites it when that set grows (before the device opens)
// and every ttl/3 otherwise. A lease counts until ttl after the object was
// last written (the store's clock, from its listing), so a host that crashed
// stops protecting anything once its lease runs out. A layer delete first
// writes a tombstone, then reads every lease: a host that opens a device
// writes its lease first, then looks for a tombstone, so of a racing delete
// and open, one of them always sees the other.
import * as os from 'os';
import { randomBytes } from 'crypto';
import type { ObjectInfo, ObjectStore } from './store/types';

export const LEASE_PREFIX = 'leases/';
export const leaseKey = (host: string) => `${LEASE_PREFIX}${host}`;
export const tombstoneKey = (layer: string) => `layers/${layer}/tombstone`;
/** A tombstone older than this is a delete that crashed midway: ignored (and collected). */
export const TOMBSTONE_MS = 5 * 60_000;
const HOST_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export interface Lease {
  host: string; hostname: string; pid: number;
  /** How long after its last write the lease counts. */
  ttlMs: number;
  layers: string[];
  /** When it was last written (the store's listing, else the writer's clock). */
  written: number;
}

export interface LeaseOptions {
  /** This host's name in the store (letters, digits, `._-`; default: random, kept by the daemon in its data directory). */
  hostId?: string;
  /** How long a lease counts after it was written (default 120 s); renewed every third of it. */
  ttlMs?: number;
  onWarning?: (msg: string, fields: Record<string, unknown>) => void;
}

/** A host id from the hostname (what the id may hold of it) and random bytes. */
export function newHostId(hostname = os.hostname()): string {
  // A guest without a hostname says "(none)": the id must still start with a letter or digit.
  const name = hostname.replace(/[^A-Za-z0-9._-]+/g, '-').replace(/^[^A-Za-z0-9]+|[^A-Za-z0-9]+$/g, '').slice(0, 40) || 'host';
  return `${name}-${randomBytes(4).toString('hex')}`;
}

/** Parses a lease object; null (with the reason) for anything not a lease. */
export function parseLease(bytes: Buffer, key: string, modified: number | undefined): Lease | string {
  let j: Record<string, unknown>;
  try { j = JSON.parse(bytes.toString('utf8')); } catch { return 'not JSON'; }
  if (!j || typeof j !== 'object' || j.format !== 'strata-lease' || j.version !== 1) return 'not a strata lease (format/version)';
  const host = key.slice(LEASE_PREFIX.length);
  if (j.host !== host) return `names host ${JSON.stringify(j.host)} but is stored as ${key}`;
  if (!Array.isArray(j.layers) || !j.layers.every((l) => typeof l === 'string' && /^[0-9a-f]{32}$/.test(l))) return 'bad layer list';
  if (typeof j.ttlMs !== 'number' || !(j.ttlMs > 0) || typeof j.written !== 'number') return 'bad ttl or time';
  return { host, hostname: String(j.hostname ?? ''), pid: Number(j.pid ?? 0), ttlMs: j.ttlMs, layers: j.layers as string[], written: modified ?? j.written };
}

/**
 * Every lease object in the store, parsed (live or run out); objects under
 * `leases/` that are not leases are warned about and skipped, never acted on.
 */
export async function readLeases(store: ObjectStore, onWarning?: (msg: string, fields: Record<string, unknown>) => void): Promise<Array<{ lease: Lease; info: ObjectInfo }>> {
  const out: Array<{ lease: Lease; info: ObjectInfo }> = [];
  for (const o of await store.list(LEASE_PREFIX)) {
    let bytes: Buffer;
    try { bytes = await store.get(o.key); } catch { continue; } // removed meanwhile: a host that stopped
    const l = parseLease(bytes, o.key, o.modified);
    if (typeof l === 'string') { onWarning?.('ignoring a lease object that is not one (left alone)', { key: o.key, reason: l }); continue; }
    out.push({ lease: l, info: o });
  }
  return out;
}

export class LeaseKeeper {
  readonly host: string;
  readonly ttlMs: number;
  private timer: NodeJS.Timeout | null = null;
  private written = new Set<string>();
  private writing: Promise<void> = Promise.resolve();
  /** Layers held by opens in progress (before the device exists to be counted). */
  private pending = new Map<string, number>();
  stats = { writes: 0, writeErrors: 0, ignored: 0 };

  constructor(private readonly store: ObjectStore, private readonly inUse: () => Set<string>, readonly opts: LeaseOptions = {}) {
    this.host = opts.hostId ?? newHostId();
    if (!HOST_RE.test(this.host)) throw new RangeError(`host id ${JSON.stringify(this.host)}: letters, digits and ._- only (1-64)`);
    this.ttlMs = opts.ttlMs ?? 120_000;
  }

  /** Writes the lease now and then every ttl/3. */
  async start(): Promise<void> {
    await this.renew(true);
    this.timer = setInterval(() => { void this.renew(true).catch(() => {}); }, Math.max(50, Math.floor(this.ttlMs / 3)));
    this.timer.unref();
  }

  /** Stops renewing; `remove`: and deletes the lease (nothing of this host is in use any more), else it runs out by itself. */
  async stop(remove: boolean): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    await this.writing.catch(() => {});
    if (remove) await this.store.delete(leaseKey(this.host)).catch(() => {});
  }

  /**
   * Holds `layers` for an open in progress: the lease naming them is written
   * before this resolves. The returned function lets go (the device, once
   * open, keeps them in use by itself).
   */
  async hold(layers: readonly string[]): Promise<() => void> {
    for (const l of layers) this.pending.set(l, (this.pending.get(l) ?? 0) + 1);
    const release = () => {
      for (const l of layers) {
        const n = (this.pending.get(l) ?? 1) - 1;
        if (n > 0) this.pending.set(l, n); else this.pending.delete(l);
      }
    };
    try { await this.renew(false); } catch (e) { release(); throw e; }
    return release;
  }

  /** Writes the lease when the layers in use differ from those it names (or always, `force`). */
  renew(force: boolean): Promise<void> {
    const p = this.writing.catch(() => {}).then(async () => {
      const now = this.current();
      if (!force && now.size === this.written.size && [...now].every((l) => this.written.has(l))) return;
      const body = { format: 'strata-lease', version: 1, host: this.host, hostname: os.hostname(), pid: process.pid, ttlMs: this.ttlMs, written: Date.now(), layers: [...now].sort() };
      try {
        await this.store.put(leaseKey(this.host), Buffer.from(JSON.stringify(body)));
        this.written = now;
        this.stats.writes++;
      } catch (e) {
        this.stats.writeErrors++;
        this.opts.onWarning?.('cannot write this host\'s lease', { host: this.host, error: (e as Error).message });
        throw e;
      }
    });
    this.writing = p;
    return p;
  }

  private current(): Set<string> {
    const s = this.inUse();
    for (const l of this.pending.keys()) s.add(l);
    return s;
  }

  /** Every lease in the store that counts now; corrupt or foreign objects are warned about and skipped. */
  async all(): Promise<Lease[]> {
    const now = Date.now();
    const leases = await readLeases(this.store, (msg, fields) => { this.stats.ignored++; this.opts.onWarning?.(msg, fields); });
    return leases.map((x) => x.lease).filter((l) => l.written + l.ttlMs > now);
  }

  /** The hosts (other than none) whose live lease names `layer`. */
  async holders(layer: string): Promise<Lease[]> {
    return (await this.all()).filter((l) => l.layers.includes(layer));
  }
}
