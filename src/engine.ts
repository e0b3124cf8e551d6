// The engine: layers in an object store, devices over them, import/export.
// Everything an embedding orchestrator needs goes through this class.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { createHash } from 'crypto';
import { Core } from './core';
import { LayerRegistry } from './layers';
import { Device, listManifests, readManifest, type DeviceOptions } from './device';
import { RangeLock } from './range-lock';
import { BLOCK_SIZE, Codec, ID_RE, keys, type LayerHeader, ZERO_LAYER, MAX_CHAIN } from './format';
import { writeLayer, type Progress, type WriteLayerStats } from './layer-writer';
import { openStore } from './store/open';
import type { ObjectStore } from './store/types';
import { einval, StrataError } from './errors';
import { CacheEvictor, type CacheLimits } from './cache-evictor';
import { CacheScrub, type ScrubResult } from './cache-scrub';
import { BootProfiles, type ProfileOptions } from './boot-profile';
import { LeaseKeeper, tombstoneKey, TOMBSTONE_MS, type LeaseOptions } from './leases';
import { collectGarbage, type GcOptions, type GcReport } from './gc';
import { traced } from './tracing';
import { liveOwner, ownerToken } from './pid';

export interface EngineOptions {
  /** An object store, or a spec for openStore: a directory (local filesystem store), file://… or s3://bucket/prefix?…. */
  store: ObjectStore | string;
  /** Local cache directory (template frames, overlays). Default: a private temp dir removed on close. */
  cacheDir?: string;
  workers?: number;
  arenaBytes?: number;
  /** Bounds on the local template cache (size, free disk space); default: unbounded. */
  cache?: CacheLimits;
  /** A directory shared by hosts (e.g. NFS) as a second frame cache tier. */
  sharedCacheDir?: string;
  /** Frame fetches from the store at once (default 16) and frames read ahead of sequential misses (default 4). */
  fetchConcurrency?: number;
  /** I/O worker threads serving NBD connections (default: STRATA_IO_WORKERS, else one per CPU). */
  ioWorkers?: number;
  readaheadFrames?: number;
  /** Boot profiles: record each device's first reads, prefetch them for the next (default on; false: off). */
  profiles?: ProfileOptions | false;
  /**
   * Leases in the store naming the layers this engine's devices use, so
   * engines on other hosts refuse to delete them (src/leases.ts). Off unless
   * given (the daemon turns them on); every engine sharing a store should.
   */
  leases?: LeaseOptions;
  /** Chain length at which snapshots compact (src/compaction.ts; default 32, at least 2). */
  maxChain?: number;
}

export interface ImportOptions {
  codec?: Codec; level?: number; onProgress?: (p: Progress) => void;
  /** Keep the imported data in the local cache, as if every frame had been fetched (default true: the importing host usually boots it next). */
  seedCache?: boolean;
}
export interface ImportResult { id: string; header: LayerHeader; stats: WriteLayerStats; bytes: number }

const heldLocks = new Set<string>();

export class Engine {
  private devices = new Set<Device>();
  private readonly evictor: CacheEvictor;
  private readonly scrubber: CacheScrub;
  /** null when profiles are off. */
  readonly profiles: BootProfiles | null;
  /** null when leases are off. */
  leases: LeaseKeeper | null = null;
  private maxChain: number | undefined;
  /** Per layer: opening devices on it share, deleting it excludes (so the two never both succeed). */
  private layerLocks = new Map<string, RangeLock>();
  private constructor(readonly core: Core, readonly layers: LayerRegistry, private readonly ownCacheDir: string | null,
    private readonly lockFile: string, limits: CacheLimits = {}, profiles: ProfileOptions | false = {}) {
    this.profiles = profiles === false ? null : new BootProfiles(core, layers, profiles);
    this.evictor = new CacheEvictor(layers, core.cacheDir, limits, (layerId) => this.holdNatives(layerId));
    this.scrubber = new CacheScrub(layers, (layerId) => this.holdNatives(layerId));
    this.scrubber.start(limits.scrubBytesPerSec ?? 0);
    if (limits.maxBytes || limits.minFreeBytes) {
      this.evictor.start();
      // Size limits are also checked as frames arrive, not only on the timer.
      if (limits.maxBytes) {
        const over = () => this.evictor.cachedBytes > limits.maxBytes!;
        core.onCached = () => { if (over()) void this.evictor.run(); };
        // A fetch into a full cache waits for room: the overshoot stays within the fetches in flight.
        core.beforeFetch = () => (over() ? this.evictor.run().then(() => undefined) : undefined);
      }
    }
  }

  /** Keeps native readers away from a layer's cache (every device reading through it). */
  private async holdNatives(layerId: string): Promise<() => void> {
    const held = await Promise.all([...this.devices].filter((d) => d.chain.includes(layerId)).map((d) => d.holdNatives()));
    return () => { for (const release of held) release(); };
  }

  /** Runs one cache eviction pass now (the engine also runs them on a timer when limits are set). */
  evictNow(): Promise<number> { return this.evictor.runFresh(); }

  /** Re-verifies cached frames now (each at most once, up to `maxBytes`), dropping any that fail. */
  scrub(maxBytes = Infinity): Promise<ScrubResult> { return this.scrubber.run(maxBytes); }

  static async open(opts: EngineOptions): Promise<Engine> {
    const store = typeof opts.store === 'string' ? openStore(opts.store) : opts.store;
    const own = opts.cacheDir ? null : fs.mkdtempSync(path.join(os.tmpdir(), 'strata-cache-'));
    const cacheDir = opts.cacheDir ?? own!;
    fs.mkdirSync(cacheDir, { recursive: true });
    // One engine per cache directory: caches and overlays are written by one
    // process at a time (a later one verifies what it reuses).
    const lockFile = path.join(cacheDir, 'engine.lock');
    if (heldLocks.has(path.resolve(lockFile))) throw new StrataError('EBUSY', `cache directory ${cacheDir} is in use by another engine in this process`);
    try {
      const fd = fs.openSync(lockFile, 'wx');
      fs.writeSync(fd, ownerToken());
      fs.closeSync(fd);
    } catch {
      // Left by a process that is gone (killed, or before a reboot: its pid
      // may name another process now, so the boot and start time count too).
      const pid = liveOwner(fs.readFileSync(lockFile, 'utf8'));
      if (pid !== null && pid !== process.pid) throw new StrataError('EBUSY', `cache directory ${cacheDir} is in use by process ${pid}`);
      fs.writeFileSync(lockFile, ownerToken());
    }
    heldLocks.add(path.resolve(lockFile));
    const core = new Core({ store, cacheDir, workers: opts.workers, arenaBytes: opts.arenaBytes, sharedCacheDir: opts.sharedCacheDir,
      fetchConcurrency: opts.fetchConcurrency, readaheadFrames: opts.readaheadFrames, ioWorkers: opts.ioWorkers });
    const e = new Engine(core, new LayerRegistry(core), own, lockFile, opts.cache, opts.profiles);
    if (opts.maxChain !== undefined && !(Number.isInteger(opts.maxChain) && opts.maxChain >= 2 && opts.maxChain <= MAX_CHAIN)) {
      await e.close();
      throw einval(`maxChain must be an integer in [2, ${MAX_CHAIN}], not ${opts.maxChain}`);
    }
    e.maxChain = opts.maxChain;
    if (opts.leases) {
      e.leases = new LeaseKeeper(store, () => e.layersInUse(), opts.leases);
      try { await e.leases.start(); } catch (err) { await e.close(); throw err; }
    }
    return e;
  }

  /** Layers this engine's devices read through, open or saved (durable devices to resume). */
  layersInUse(): Set<string> {
    const s = new Set<string>();
    for (const d of this.devices) for (const l of d.chain) s.add(l);
    for (const id of this.savedDevices()) {
      try { s.add(readManifest(path.join(this.core.cacheDir, 'devices'), id).layer); } catch { /* unreadable: resume reports it */ }
    }
    return s;
  }

  /**
   * Before a device opens on `layer`: this host's lease names it, and no
   * delete of it is under way (leases.ts: the lease first, then the tombstone check).
   */
  private async leaseFor(layer: string): Promise<() => void> {
    if (!this.leases) return () => {};
    const release = await this.leases.hold([layer]);
    try {
      // A delete under way either finishes (the header goes) or, seeing this
      // lease, takes its tombstone back: wait for one or the other.
      const until = Date.now() + 10_000;
      for (;;) {
        const t = (await this.store.list(tombstoneKey(layer))).find((o) => o.key === tombstoneKey(layer));
        if (!t || (t.modified !== undefined && Date.now() - t.modified >= TOMBSTONE_MS)) break;
        if (Date.now() > until) throw new StrataError('ETIMEDOUT', `layer ${layer} is being deleted by another host`);
        await new Promise((r) => setTimeout(r, 50));
      }
      // Another host may have deleted it since this one read its header.
      if (!(await this.store.head(keys.header(layer)))) {
        this.layers.forget(layer);
        throw new StrataError('ENOENT', `layer ${layer} not found (deleted)`);
      }
    } catch (e) { release(); throw e; }
    return release;
  }

  get store(): ObjectStore { return this.core.store; }

  /** Collects garbage in the store and the shared tier (src/gc.ts); a dry run unless `dryRun: false`. */
  gc(opts: Omit<GcOptions, 'sharedTierDir'> = {}): Promise<GcReport> {
    return collectGarbage(this.store, { ...opts, sharedTierDir: this.core.tier2?.root });
  }

  /** Imports a raw disk image (size a multiple of 4 KiB) as a new base layer. */
  importImage(imagePath: string, opts: ImportOptions = {}): Promise<ImportResult> {
    return traced('strata.import', { 'strata.image': imagePath }, () => this.importImageUntraced(imagePath, opts));
  }

  private async importImageUntraced(imagePath: string, opts: ImportOptions): Promise<ImportResult> {
    let fd: number;
    try { fd = fs.openSync(imagePath, 'r'); } catch (e) { throw new StrataError('ENOENT', `cannot open image ${imagePath}: ${(e as Error).message}`); }
    try {
      const st = fs.fstatSync(fd);
      const size = st.isBlockDevice() ? blockDeviceSize(imagePath) : st.size;
      if (size === 0 || size % BLOCK_SIZE) throw einval(`image ${imagePath} is ${size} bytes: a raw image must be a non-zero multiple of ${BLOCK_SIZE} bytes`);
      const blocks = size / BLOCK_SIZE;
      const { header, stats } = await writeLayer(this.core, this.layers, {
        virtualSize: size, codec: opts.codec ?? Codec.Zstd, level: opts.level ?? 3, fd,
        dataRuns: [{ devBlock: 0, count: blocks, fileBlock: 0 }], zeroRuns: [], onProgress: opts.onProgress, seed: opts.seedCache ?? true,
      });
      return { id: header.chain[0], header, stats, bytes: size };
    } finally { fs.closeSync(fd); }
  }

  /** Writes the full raw image of a layer (zero extents become holes); returns its sha256. */
  async exportLayer(id: string, outPath: string, opts: { onProgress?: (p: Progress) => void } = {}): Promise<{ bytes: number; sha256: string }> {
    const header = await this.layers.header(id);
    const dev = await this.openDevice(id);
    const fd = fs.openSync(outPath, 'w', 0o644);
    const hash = createHash('sha256');
    try {
      fs.ftruncateSync(fd, header.virtualSize);
      const CH = 4 * 1024 * 1024;
      const zero = Buffer.alloc(CH);
      let done = 0;
      // Read ahead a few chunks; write and hash strictly in order.
      const pending: Array<Promise<Buffer | null>> = [];
      const chunkAt = (off: number) => {
        const len = Math.min(CH, header.virtualSize - off);
        return allZeroExtent(header, off, len) ? Promise.resolve(null) : dev.read(off, len);
      };
      let next = 0;
      while (next < header.virtualSize && pending.length < 4) { pending.push(chunkAt(next)); next += CH; }
      while (pending.length) {
        const buf = await pending.shift()!;
        const len = Math.min(CH, header.virtualSize - done);
        if (next < header.virtualSize) { pending.push(chunkAt(next)); next += CH; }
        if (buf) { writeAll(fd, buf, done); hash.update(buf); } else hash.update(zero.subarray(0, len));
        done += len;
        opts.onProgress?.({ phase: 'pack', done: done / BLOCK_SIZE, total: header.virtualSize / BLOCK_SIZE });
      }
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
      await dev.close();
      this.devices.delete(dev);
    }
    return { bytes: header.virtualSize, sha256: hash.digest('hex') };
  }

  inspect(id: string): Promise<LayerHeader> { return this.layers.header(id); }

  /** Ids of complete layers (those whose header exists). */
  async listLayers(): Promise<string[]> {
    const objs = await this.store.list('layers/');
    return objs.map((o) => o.key.split('/')).filter((p) => p.length === 3 && p[2] === 'header' && ID_RE.test(p[1])).map((p) => p[1]);
  }

  /**
   * Deletes a layer. Refused (EBUSY) while an open device reads through it or
   * another layer's chain names it. The header goes first: from then on the
   * layer no longer exists for any reader, and a crash midway leaves only
   * unreferenced data objects behind, never a header without its data.
   */
  deleteLayer(id: string): Promise<void> {
    return this.withLayer(id, true, () => this.deleteLayerLocked(id));
  }

  private async deleteLayerLocked(id: string): Promise<void> {
    await this.layers.header(id); // ENOENT / EINVAL first
    for (const d of this.devices) {
      if (d.chain.includes(id)) throw new StrataError('EBUSY', `layer ${id} is in use by device ${d.id}`);
    }
    for (const saved of this.savedDevices()) {
      const m = readManifest(path.join(this.core.cacheDir, 'devices'), saved);
      const h = await this.layers.header(m.layer).catch(() => null);
      if (!h || h.chain.includes(id)) throw new StrataError('EBUSY', `layer ${id} is used by the saved device ${saved} (resume or delete it first)`);
    }
    // Other hosts: a tombstone first, then their leases (an open racing this
    // one writes its lease first, then looks for the tombstone).
    const t0 = Date.now();
    if (this.leases) {
      await this.store.put(tombstoneKey(id), Buffer.from(JSON.stringify({ host: this.leases.host, at: new Date().toISOString() })));
      try {
        const holders = (await this.leases.holders(id)).filter((l) => l.host !== this.leases!.host);
        if (holders.length) {
          const l = holders[0];
          throw new StrataError('EBUSY', `layer ${id} is in use on host ${l.host} (${l.hostname}, pid ${l.pid}; lease written ${Math.round((Date.now() - l.written) / 1000)} s ago, counts for ${Math.round(l.ttlMs / 1000)} s)` +
            (holders.length > 1 ? ` and ${holders.length - 1} other host(s)` : ''));
        }
      } catch (e) { await this.store.delete(tombstoneKey(id)).catch(() => {}); throw e; }
    }
    try {
      for (const other of await this.listLayers()) {
        if (other === id) continue;
        const h = await this.layers.header(other).catch(() => null);
        if (h?.chain.includes(id)) throw new StrataError('EBUSY', `layer ${id} is a parent of layer ${other}`);
      }
      // A delete that took longer than opens trust a tombstone would race them.
      if (Date.now() - t0 > TOMBSTONE_MS / 2) throw new StrataError('ETIMEDOUT', `deleting layer ${id} took too long to be safe against other hosts; try again`);
    } catch (e) {
      if (this.leases) await this.store.delete(tombstoneKey(id)).catch(() => {});
      throw e;
    }
    await this.store.delete(keys.header(id));
    this.layers.forget(id);
    await this.store.delete(keys.index(id));
    await this.store.delete(keys.profile(id));
    await this.store.delete(keys.data(id));
    if (this.leases) await this.store.delete(tombstoneKey(id));
  }

  openDevice(layerId: string, opts: DeviceOptions = {}): Promise<Device> {
    return this.opening(layerId, () => Device.open(this.core, this.layers, layerId, { ...this.deviceHooks(), ...opts }));
  }

  /** Brings back a durable device (see Device.resume), also one a crashed process left. */
  async resumeDevice(id: string): Promise<Device> {
    for (const d of this.devices) if (d.id === id) throw new StrataError('EBUSY', `device ${id} is already open`);
    const layer = readManifest(path.join(this.core.cacheDir, 'devices'), id).layer;
    return this.opening(layer, () => Device.resume(this.core, this.layers, id, this.deviceHooks()));
  }

  /**
   * What every device open goes through: the layer's lock (against a delete
   * here), its lease (against one on another host), its boot profile
   * (fetched alongside the header), and a lease naming the whole chain once open.
   */
  private opening(layer: string, open: () => Promise<Device>): Promise<Device> {
    return this.withLayer(layer, false, async () => {
      const release = await this.leaseFor(layer);
      let d: Device;
      try {
        const profile = this.profiles?.load(layer);
        d = await open();
        this.devices.add(d);
        this.profiles?.start(d, profile);
      } finally { release(); }
      await this.leases?.renew(false).catch(() => {});
      return d;
    });
  }

  /** The engine's part in every device: its chain limit, and after each committed snapshot a lease on the new layer and its inherited boot profile. */
  private deviceHooks(): Pick<DeviceOptions, 'onSnapshot' | 'maxChain'> {
    const p = this.profiles;
    return {
      maxChain: this.maxChain,
      onSnapshot: async (d, child) => {
        await this.leases?.renew(false).catch(() => {}); // the device now reads through the new layer
        await p?.inherit(d, child);
      },
    };
  }

  private async withLayer<T>(id: string, exclusive: boolean, fn: () => Promise<T>): Promise<T> {
    let lock = this.layerLocks.get(id);
    if (!lock) this.layerLocks.set(id, lock = new RangeLock());
    const unlock = await lock.acquire(0, 1, exclusive);
    try { return await fn(); } finally {
      unlock();
      if (lock.size === 0 && this.layerLocks.get(id) === lock) this.layerLocks.delete(id);
    }
  }

  /** Durable devices kept in the cache directory and not open now. */
  savedDevices(): string[] {
    const open = new Set([...this.devices].map((d) => d.id));
    return listManifests(path.join(this.core.cacheDir, 'devices')).filter((id) => !open.has(id));
  }

  /** Lets go of a durable device, keeping it for resumeDevice(). */
  async suspendDevice(d: Device): Promise<void> {
    try { await d.suspend(); } finally { this.devices.delete(d); } // closed also when it throws
  }

  async closeDevice(d: Device): Promise<void> {
    await d.close();
    this.devices.delete(d);
    void this.leases?.renew(false).catch(() => {}); // no longer naming what nothing here uses
  }

  stats() {
    const f = this.core.fetches;
    return {
      cache: this.layers.stats(), shared: this.core.tier2 ? { ...this.core.tier2.stats } : null, uring: { ...this.core.uring.stats }, arenaUsed: this.core.arena.used,
      fetches: { limit: f.limit, active: f.active, queued: f.queued, demand: f.stats.started[0], readahead: f.stats.started[1], prefetch: f.stats.started[2], promoted: f.stats.promoted, peak: f.stats.peakRunning },
      profiles: this.profiles ? { ...this.profiles.stats } : null,
    };
  }

  async close(): Promise<void> {
    await this.evictor.stop();
    await this.scrubber.stop();
    await this.profiles?.flush();
    await this.core.tier2?.idle();
    // Durable devices are kept for the next process; the others are dropped.
    // One device that cannot be suspended (a lost writeback) must not keep the others from it.
    const failed: Error[] = [];
    for (const d of [...this.devices]) {
      await (d.durable ? this.suspendDevice(d) : this.closeDevice(d)).catch((e: Error) => { failed.push(e); this.devices.delete(d); });
    }
    // Saved durable devices keep their layers leased until the lease runs
    // out (a restart within the ttl finds them still protected); otherwise
    // nothing of this host is in use.
    if (this.leases) {
      const keep = this.savedDevices().length > 0;
      if (keep) await this.leases.renew(true).catch(() => {});
      await this.leases.stop(!keep);
    }
    await this.layers.closeAll();
    await this.core.close();
    fs.rmSync(this.lockFile, { force: true });
    heldLocks.delete(path.resolve(this.lockFile));
    if (this.ownCacheDir) fs.rmSync(this.ownCacheDir, { recursive: true, force: true });
    if (failed.length) throw failed.length === 1 ? failed[0] : new StrataError('EIO', failed.map((e) => e.message).join('; '));
  }
}

function allZeroExtent(h: LayerHeader, off: number, len: number): boolean {
  for (const e of h.extents) {
    if (e.dev + e.len <= off) continue;
    if (e.dev >= off + len) break;
    if (e.layer !== ZERO_LAYER) return false;
  }
  return true;
}

function writeAll(fd: number, b: Buffer, pos: number): void {
  let done = 0;
  while (done < b.length) done += fs.writeSync(fd, b, done, b.length - done, pos + done);
}

function blockDeviceSize(p: string): number {
  const fd = fs.openSync(p, 'r');
  try {
    // lseek(SEEK_END) is not exposed; read the size from sysfs instead.
    const name = path.basename(fs.realpathSync(p));
    return Number(fs.readFileSync(`/sys/class/block/${name}/size`, 'utf8')) * 512;
  } finally { fs.closeSync(fd); }
}
