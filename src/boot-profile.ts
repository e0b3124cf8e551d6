// Boot profiles: the order in which a device first read the frames of its
// layers during its first seconds, kept with the layer in the store
// (`layers/<id>/profile`, docs/format.md). A new device on a layer with a
// profile fetches those frames at once, in that order, as background work
// (fetch-queue.ts: a guest's own misses always go first), so a cold host
// boots at nearly local speed. A snapshot inherits its parent's profile,
// refined by what its device read; a device on a layer whose profile was
// inherited records its own and replaces it.
import type { Core } from './core';
import type { LayerRegistry } from './layers';
import type { LayerCache } from './layer-cache';
import { keys, type LayerHeader } from './format';
import { ebadmsg } from './errors';
import { Priority } from './fetch-queue';

export const PROFILE_MAGIC = Buffer.from('STRATAPF', 'ascii');
export const PROFILE_VERSION = 1;
export const FLAG_INHERITED = 1;
export const MAX_ENTRIES = 65536;
const HEAD = 24; // magic 8, version 4, flags 4, count 4, reserved 4
const ENTRY = 12; // chain index 4, frame 4, ms 4
const MAX_BYTES = HEAD + MAX_ENTRIES * ENTRY + 8;

/** A frame of one of the chain's layers, first read `ms` after the device opened. */
export interface ProfileEntry { layer: string; frame: number; ms: number }
export interface Profile { inherited: boolean; entries: ProfileEntry[] }

export interface ProfileOptions {
  /** How long a new device's first reads are recorded (default 60 s). */
  windowMs?: number;
  /** Most frames recorded (default 4096). */
  maxEntries?: number;
  /** How often the recorder looks at which frames were read (default 20 ms). */
  sampleMs?: number;
  /** Profile prefetches a device keeps queued (default 32; the fetch queue decides how many run). */
  depth?: number;
  onWarning?: (msg: string, fields: Record<string, unknown>) => void;
}

export function encodeProfile(p: Profile, chain: readonly string[], checksum: (b: Buffer) => bigint): Buffer {
  const idx = new Map(chain.map((id, i) => [id, i]));
  const entries = p.entries.filter((e) => idx.has(e.layer)).slice(0, MAX_ENTRIES);
  const b = Buffer.alloc(HEAD + entries.length * ENTRY + 8);
  PROFILE_MAGIC.copy(b, 0);
  b.writeUInt32LE(PROFILE_VERSION, 8);
  b.writeUInt32LE(p.inherited ? FLAG_INHERITED : 0, 12);
  b.writeUInt32LE(entries.length, 16);
  entries.forEach((e, k) => {
    const o = HEAD + k * ENTRY;
    b.writeUInt32LE(idx.get(e.layer)!, o);
    b.writeUInt32LE(e.frame, o + 4);
    b.writeUInt32LE(Math.min(0xffffffff, Math.max(0, Math.round(e.ms))), o + 8);
  });
  b.writeBigUInt64LE(checksum(b.subarray(0, b.length - 8)), b.length - 8);
  return b;
}

/** Decodes and checks a profile against the layers of `chain` (their frame counts). Throws EBADMSG. */
export function decodeProfile(b: Buffer, chain: readonly LayerHeader[], checksum: (b: Buffer) => bigint): Profile {
  if (b.length < HEAD + 8) throw ebadmsg(`profile truncated (${b.length} bytes)`);
  if (!b.subarray(0, 8).equals(PROFILE_MAGIC)) throw ebadmsg('profile has the wrong magic');
  if (b.readUInt32LE(8) !== PROFILE_VERSION) throw ebadmsg(`profile version ${b.readUInt32LE(8)} is not supported`);
  const n = b.readUInt32LE(16);
  if (n > MAX_ENTRIES || b.length !== HEAD + n * ENTRY + 8) throw ebadmsg(`profile of ${b.length} bytes does not hold ${n} entries`);
  if (b.readBigUInt64LE(b.length - 8) !== checksum(b.subarray(0, b.length - 8))) throw ebadmsg('profile checksum mismatch');
  const entries: ProfileEntry[] = [];
  for (let k = 0; k < n; k++) {
    const o = HEAD + k * ENTRY;
    const li = b.readUInt32LE(o), frame = b.readUInt32LE(o + 4);
    if (li >= chain.length) throw ebadmsg(`profile entry ${k} names layer #${li} of a chain of ${chain.length}`);
    if (frame >= chain[li].frames.length) throw ebadmsg(`profile entry ${k} names frame ${frame} of layer ${chain[li].chain[0]}, which has ${chain[li].frames.length}`);
    entries.push({ layer: chain[li].chain[0], frame, ms: b.readUInt32LE(o + 8) });
  }
  return { inherited: (b.readUInt32LE(12) & FLAG_INHERITED) !== 0, entries };
}

/** `first` then the entries of `rest` it does not have (a refined or inherited profile). */
export function mergeEntries(first: ProfileEntry[], rest: ProfileEntry[]): ProfileEntry[] {
  const seen = new Set(first.map((e) => `${e.layer}:${e.frame}`));
  return [...first, ...rest.filter((e) => !seen.has(`${e.layer}:${e.frame}`))].slice(0, MAX_ENTRIES);
}

/** What a device needs from its profile session (device.ts stays unaware of profiles). */
export interface ProfiledDevice {
  readonly isClosed: boolean;
  readonly layerId: string;
  readonly chain: readonly string[];
}

/**
 * Per engine: loads a device's profile and prefetches it, records a device's
 * first reads and writes them as its layer's profile, and gives each new
 * snapshot its inherited profile.
 */
export class BootProfiles {
  private readonly sessions = new WeakMap<ProfiledDevice, Session>();
  /** Sessions still recording (finished at engine close). */
  readonly recording = new Set<Session>();
  readonly stats = { loaded: 0, invalid: 0, written: 0, writeErrors: 0, prefetched: 0, recorded: 0 };

  constructor(private readonly core: Core, private readonly registry: LayerRegistry, readonly opts: ProfileOptions = {}) {}

  /**
   * Starts a device's session: records its first reads at once, and
   * prefetches its layer's profile once loaded (the device does not wait for
   * the store). Never throws.
   */
  start(d: ProfiledDevice, loading = this.load(d.layerId)): void {
    const s = new Session(this, d);
    this.sessions.set(d, s);
    s.begin(loading);
  }

  /** What `d` has recorded so far (its first reads, in order). */
  recorded(d: ProfiledDevice): ProfileEntry[] { return this.sessions.get(d)?.recorded() ?? []; }

  /** A snapshot of `d` was committed as `child`: it gets the profile its parent has, refined by what `d` read. */
  async inherit(d: ProfiledDevice, child: LayerHeader): Promise<void> {
    const s = this.sessions.get(d);
    await s?.whenLoaded();
    const entries = mergeEntries(this.recorded(d), s?.profile?.entries ?? []);
    if (entries.length) await this.save(child, { inherited: true, entries });
  }

  /** The profile stored with a layer, or null (absent; corrupt or invalid ones are warned about and ignored). */
  async load(layerId: string): Promise<Profile | null> {
    let bytes: Buffer;
    try {
      const head = await this.core.store.head(keys.profile(layerId));
      if (!head) return null;
      // Refused before reading: a huge object must not be pulled into memory.
      if (head.size > MAX_BYTES) throw ebadmsg(`profile object of ${head.size} bytes is over the ${MAX_BYTES}-byte limit`);
      bytes = await this.core.store.get(keys.profile(layerId));
    } catch (e) {
      this.warn('cannot read boot profile; booting without it', { layer: layerId, error: (e as Error).message });
      return null;
    }
    try {
      const header = await this.registry.header(layerId);
      const chain = await Promise.all(header.chain.map((id) => this.registry.header(id)));
      const p = decodeProfile(bytes, chain, (b) => this.core.checksum(b));
      this.stats.loaded++;
      return p;
    } catch (e) {
      this.stats.invalid++;
      this.warn('ignoring an invalid boot profile', { layer: layerId, error: (e as Error).message });
      return null;
    }
  }

  async save(h: LayerHeader, p: Profile): Promise<void> {
    try {
      await this.core.store.put(keys.profile(h.chain[0]), encodeProfile(p, h.chain, (b) => this.core.checksum(b)));
      this.stats.written++;
    } catch (e) {
      this.stats.writeErrors++;
      this.warn('cannot store boot profile', { layer: h.chain[0], error: (e as Error).message });
    }
  }

  // One sampling clock for every recording session: per tick each layer
  // cache's marks are read once, whatever the number of devices (not a
  // timer and a scan of every frame per device per tick).
  private ticker: NodeJS.Timeout | null = null;

  /** A session records from now on, until untrack(). */
  track(s: Session): void {
    this.recording.add(s);
    if (!this.ticker) {
      this.ticker = setInterval(() => this.sample(), this.opts.sampleMs ?? 20);
      this.ticker.unref();
    }
  }

  untrack(s: Session): void {
    this.recording.delete(s);
    if (!this.recording.size && this.ticker) { clearInterval(this.ticker); this.ticker = null; }
  }

  private sample(): void {
    const marks = new Map<LayerCache, number[]>();
    const referenced = (c: LayerCache) => {
      let m = marks.get(c);
      if (!m) marks.set(c, (m = c.referenced()));
      return m;
    };
    for (const s of [...this.recording]) s.sample(referenced);
  }

  /** Ends every recording now, storing what was recorded (the engine is closing). */
  async flush(): Promise<void> {
    await Promise.all([...this.recording].map((s) => s.finish()));
  }

  warn(msg: string, fields: Record<string, unknown>): void { this.opts.onWarning?.(msg, fields); }
  cacheOf(layerId: string): Promise<LayerCache> { return this.registry.cache(layerId); }
  header(layerId: string): Promise<LayerHeader> { return this.registry.header(layerId); }
}

/** One device's prefetch and recording. */
export class Session {
  private entries: ProfileEntry[] = [];
  private seen = new Map<LayerCache, Uint8Array>();
  private t0 = performance.now();
  /** The layer and chain the device was opened on (a snapshot rebases it later). */
  private readonly layer: string;
  private readonly chain: readonly string[];

  /** The layer's profile when the device opened (null until loaded, or when it has none). */
  profile: Profile | null = null;

  constructor(private readonly owner: BootProfiles, private readonly d: ProfiledDevice) {
    this.layer = d.layerId;
    this.chain = d.chain;
  }

  recorded(): ProfileEntry[] { return this.entries; }
  whenLoaded(): Promise<void> { return this.loaded; }

  begin(loading: Promise<Profile | null>): void {
    // Always recorded (a snapshot inherits what its device read); stored only
    // for a layer without a profile of its own.
    this.loaded = loading.then((p) => {
      this.profile = p;
      if (p?.entries.length) void this.prefetch(p.entries);
    });
    void this.record();
  }

  private loaded: Promise<void> = Promise.resolve();

  /** Fetches the profile's frames in order, `depth` at a time, until done or the device closes. */
  private async prefetch(entries: ProfileEntry[]): Promise<void> {
    const depth = this.owner.opts.depth ?? 32;
    let next = 0;
    const lane = async () => {
      while (next < entries.length && !this.d.isClosed) {
        const e = entries[next++];
        const cache = await this.owner.cacheOf(e.layer).catch(() => null);
        if (!cache) continue;
        await cache.prefetchFrame(e.frame, Priority.Prefetch);
        this.owner.stats.prefetched++;
      }
    };
    await Promise.all(Array.from({ length: depth }, lane));
  }

  /** Samples which frames the device's layers were read from, in order, for the window. */
  private async record(): Promise<void> {
    const caches = (await Promise.all(this.chain.map((id) => this.owner.cacheOf(id).catch(() => null)))).filter((c): c is LayerCache => !!c);
    for (const c of caches) { c.clearRefs(); this.seen.set(c, new Uint8Array(c.frameCount)); }
    if (!this.finishing) this.owner.track(this);
  }

  /** One tick of the owner's clock: the frames of this device's layers read since, in order. */
  sample(referenced: (c: LayerCache) => number[]): void {
    const windowMs = this.owner.opts.windowMs ?? 60_000, max = this.owner.opts.maxEntries ?? 4096;
    const ms = performance.now() - this.t0;
    for (const [c, seen] of this.seen) {
      for (const i of referenced(c)) {
        if (seen[i]) continue;
        seen[i] = 1;
        if (this.entries.length < max) this.entries.push({ layer: c.id, frame: i, ms });
      }
    }
    if (this.d.isClosed || ms >= windowMs || this.entries.length >= max) void this.finish();
  }

  private finishing: Promise<void> | null = null;
  finish(): Promise<void> { return (this.finishing ??= this.store()); }

  private async store(): Promise<void> {
    this.owner.untrack(this);
    await this.loaded; // whether the layer has a profile of its own
    if (!this.entries.length) return;
    this.owner.stats.recorded++;
    if (this.profile && !this.profile.inherited) return; // the layer's own profile is kept
    const header = await this.owner.header(this.layer).catch(() => null);
    if (!header) return;
    await this.owner.save(header, { inherited: false, entries: mergeEntries(this.entries, this.profile?.entries ?? []) });
  }
}
