// A writable device over a layer chain. Reads resolve, block by block, through
//   current overlay → frozen overlays (newest first; only while snapshots
//   upload) → base
// where an overlay is a sparse local file plus one state byte per block in
// shared memory (ABSENT / DIRTY / ZERO) and the base is the layer mapping
// served from the per-layer frame caches. All data moves through io_uring on
// the registered I/O arena.
import * as fs from 'fs';
import * as path from 'path';
import { randomBytes } from 'crypto';
import type { Core } from './core';
import type { LayerRegistry } from './layers';
import type { LayerCache } from './layer-cache';
import { BLOCK_SIZE, Codec, type Extent, type LayerHeader } from './format';
import { MappingTable } from './mapping';
import { RangeLock } from './range-lock';
import { S } from './wasm';
import { Pinned, ViewRecord, SegKind } from './device-view';
import { einval, StrataError } from './errors';
import { writeLayer, type BlockRun, type Progress, type WriteLayerStats } from './layer-writer';
import { DeviceGate, type GateStats } from './device-gate';
import { traced } from './tracing';
import { compactionPlan, copyUp, MAX_CHAIN_DEFAULT } from './compaction';
import { crashPoint } from './crash-point';
import { GroupSync } from './group-sync';
import { loadNative } from './native';
import type { IoWorkers } from './io/pool';

const BS = BLOCK_SIZE;
const SECTOR = 512;
/** Largest piece of a request that holds arena memory at once. */
const CHUNK_BLOCKS = 256;

// zfd: the zero journal of a durable device's overlay (-1 otherwise): a
// record per zeroed run, so a restarted process can tell zeroed blocks
// (holes in the overlay) from never-written ones (holes too). zsync: its
// group-committed fdatasync (null without a journal).
interface Overlay {
  gen: number; file: string; fd: number; table: number; pin: Pinned; zfd: number; zlen: number; zsync: GroupSync | null;
  keep: { files: () => boolean };
}
interface Base { header: LayerHeader; map: MappingTable; caches: Map<number, LayerCache>; pin: Pinned }
interface View { cur: Overlay; frozen: Overlay[]; base: Base; rec: ViewRecord }

export interface DeviceOptions {
  /** Device id (used for its overlay file names); random when omitted. */
  id?: string;
  /** Codec for snapshots (default: the base layer's codec). */
  codec?: Codec;
  /**
   * Keep the device across processes: a manifest and the overlay files
   * survive suspend() and crashes, and Engine.resumeDevice() brings it back.
   */
  durable?: boolean;
  /** Opaque JSON kept in a durable device's manifest (e.g. the daemon's frontend). */
  meta?: Record<string, unknown>;
  /** Chain length at which a snapshot compacts (src/compaction.ts; default 32). */
  maxChain?: number;
  /** Called once a snapshot's layer is committed, before snapshot() resolves (the engine gives it a boot profile). */
  onSnapshot?: (device: Device, child: LayerHeader) => Promise<void>;
}

/** A durable device's manifest (devices/<id>.json). */
export interface DeviceManifest {
  version: 1; id: string; layer: string; size: number; gens: number[];
  codec?: Codec; meta?: Record<string, unknown>; saved: string;
  /** Set once writing the overlay back failed: the device is not resumed (its files stay for inspection). */
  writebackError?: string;
}

export interface SnapshotOptions {
  codec?: Codec; level?: number; onProgress?: (p: Progress) => void;
  /** Called once the snapshot point is taken, before the upload: e.g. to thaw a filesystem frozen for it. */
  onFrozen?: () => void;
}
export interface SnapshotResult { id: string; header: LayerHeader; stats: WriteLayerStats; frozenMs: number }

export interface Extent2 { offset: number; length: number; zero: boolean }

export class Device {
  readonly id: string;
  readonly size: number;
  readonly blocks: number;
  private cur: Overlay;
  /** Overlays frozen by snapshots still uploading, oldest first. */
  private frozen: Overlay[] = [];
  private base: Base;
  /** The view as the WASM planner reads it (rewritten by publish()). */
  private rec!: ViewRecord;
  private readonly locks = new RangeLock();
  private lastSnapshot: Promise<unknown> = Promise.resolve();
  private gen = 0;
  private closed = false;
  /** The first failed fsync of an overlay file: from then on nothing is durable (see syncFiles). */
  private writebackError: StrataError | null = null;
  /** suspend(): overlay files and manifest stay for a later resume. */
  private keepFiles = false;
  private readonly dir: string;
  /** Set once the I/O workers serve this device (see device-gate.ts). */
  private ioGate: DeviceGate | null = null;
  stats = { reads: 0, writes: 0, readBytes: 0, writeBytes: 0, trims: 0, flushes: 0, snapshots: 0 };

  private constructor(private readonly core: Core, private readonly registry: LayerRegistry,
    base: Base, private readonly opts: DeviceOptions, overlays?: Overlay[]) {
    this.id = opts.id ?? randomBytes(8).toString('hex');
    if (!DEVICE_ID.test(this.id)) throw einval(`invalid device id ${JSON.stringify(this.id)}`);
    this.size = base.header.virtualSize;
    this.blocks = this.size / BS;
    this.base = base;
    this.dir = path.join(core.cacheDir, 'devices');
    if (overlays?.length) {
      for (const o of overlays) o.keep.files = () => this.keepFiles;
      this.cur = overlays[overlays.length - 1];
      this.frozen = overlays.slice(0, -1);
      this.gen = this.cur.gen + 1;
    } else {
      if (opts.durable && fs.existsSync(manifestPath(this.dir, this.id))) {
        throw new StrataError('EEXIST', `a durable device ${this.id} exists here (resume or delete it)`);
      }
      this.cur = this.newOverlay();
    }
    this.publish();
    this.saveManifest();
  }

  static async open(core: Core, registry: LayerRegistry, layerId: string, opts: DeviceOptions = {}): Promise<Device> {
    const base = await resolveBase(core, registry, await registry.header(layerId));
    return new Device(core, registry, base, opts);
  }

  /**
   * Brings back a durable device from its manifest and overlay files, also
   * after a crash: zeroed runs come from the zero journal, written blocks
   * from the overlay's allocated ranges (writes fill whole blocks and zeroing
   * punches holes). Overlays a crash left frozen (a snapshot upload cut
   * short) are folded back, so every write is kept.
   */
  static async resume(core: Core, registry: LayerRegistry, id: string, hooks: Pick<DeviceOptions, 'onSnapshot' | 'maxChain'> = {}): Promise<Device> {
    const dir = path.join(core.cacheDir, 'devices');
    const m = readManifest(dir, id);
    if (m.writebackError) {
      throw new StrataError('EIO', `device ${id} lost writes before it was suspended and is not resumed (its files stay in ${dir}): ${m.writebackError}`);
    }
    const header = await registry.header(m.layer);
    if (header.virtualSize !== m.size) throw new StrataError('EBADMSG', `device ${id}: manifest size ${m.size} differs from layer ${m.layer}`);
    sweepOrphans(dir, id, m.gens);
    const base = await resolveBase(core, registry, header);
    const overlays: Overlay[] = [];
    try {
      for (const gen of m.gens) overlays.push(recoverOverlay(core, dir, id, gen, m.size));
    } catch (e) {
      for (const o of overlays) o.pin.retire();
      base.pin.retire();
      throw e;
    }
    const d = new Device(core, registry, base, { id, codec: m.codec, durable: true, meta: m.meta, ...hooks }, overlays);
    if (d.frozen.length) await d.foldBack();
    return d;
  }

  get durable(): boolean { return !!this.opts.durable; }
  get isClosed(): boolean { return this.closed; }
  get meta(): Record<string, unknown> | undefined { return this.opts.meta; }

  /** Merges into the meta kept in a durable device's manifest (saved at once). */
  updateMeta(patch: Record<string, unknown>): void {
    this.opts.meta = { ...this.opts.meta, ...patch };
    this.saveManifest();
  }

  /** Writes the manifest (durable devices): atomically, fsynced. */
  private saveManifest(): void {
    if (!this.opts.durable || this.closed) return;
    const m: DeviceManifest = {
      version: 1, id: this.id, layer: this.layerId, size: this.size, gens: [...this.frozen, this.cur].map((o) => o.gen),
      codec: this.opts.codec, meta: this.opts.meta, saved: new Date().toISOString(),
      ...(this.writebackError ? { writebackError: this.writebackError.message } : {}),
    };
    const file = manifestPath(this.dir, this.id);
    const tmp = `${file}.tmp`;
    const fd = fs.openSync(tmp, 'w', 0o600);
    try { fs.writeSync(fd, JSON.stringify(m)); fs.fsyncSync(fd); } finally { fs.closeSync(fd); }
    fs.renameSync(tmp, file);
    const dfd = fs.openSync(this.dir, 'r');
    try { fs.fsyncSync(dfd); } finally { fs.closeSync(dfd); }
  }

  /** The layer this device's unchanged blocks come from. */
  get layerId(): string { return this.base.header.chain[0]; }

  /** Every layer this device reads through (its base layer first). */
  get chain(): readonly string[] { return this.base.header.chain; }

  // ------------------------------------------------------------- requests

  async read(offset: number, length: number): Promise<Buffer> {
    const out = Buffer.allocUnsafe(length);
    await this.readInto(offset, out);
    return out;
  }

  /** Reads into `dest` (a copy: later writes never change it, H1). */
  async readInto(offset: number, dest: Uint8Array): Promise<void> {
    this.check(offset, dest.length, 'read');
    if (dest.length === 0) return;
    await this.readLocked(offset, dest.length, async (view, b0, b1) => {
      for (let c0 = b0; c0 < b1; c0 += CHUNK_BLOCKS) {
        const c1 = Math.min(b1, c0 + CHUNK_BLOCKS);
        const ptr = await this.readChunk(view, c0, c1);
        const from = Math.max(offset, c0 * BS), to = Math.min(offset + dest.length, c1 * BS);
        dest.set(this.core.heap.u8.subarray(ptr + from - c0 * BS, ptr + to - c0 * BS), from - offset);
        this.core.arena.release(ptr);
      }
    });
  }

  /**
   * Reads into a buffer of its own in the registered arena and hands out a
   * view of it, saving the copy and allocation of read(). The bytes are
   * private to the caller (no later write changes them, H1) until release(),
   * which must be called exactly once. Only for lengths up to 1 MiB.
   */
  async readView(offset: number, length: number): Promise<{ data: Buffer; release(): void }> {
    this.check(offset, length, 'read');
    if (length === 0 || length > CHUNK_BLOCKS * BS) throw einval(`readView of ${length} bytes (1 byte .. 1 MiB)`);
    const { ptr, b0 } = await this.readLocked(offset, length, async (view, b0, b1) => ({ ptr: await this.readChunk(view, b0, b1), b0 }));
    const arena = this.core.arena;
    let released = false;
    return {
      data: this.core.heap.slice(ptr + offset - b0 * BS, length),
      release: () => { if (!released) { released = true; arena.release(ptr); } },
    };
  }

  /** Runs fn with blocks [b0, b1) read-locked and the current view pinned. */
  private async readLocked<T>(offset: number, length: number, fn: (view: View, b0: number, b1: number) => Promise<T>): Promise<T> {
    this.stats.reads++; this.stats.readBytes += length;
    const b0 = Math.floor(offset / BS), b1 = Math.ceil((offset + length) / BS);
    const unlock = await this.locks.acquire(b0, b1, false);
    const view = this.pinView();
    try { return await this.striped(b0, b1, false, () => fn(view, b0, b1)); } finally { this.unpinView(view); unlock(); }
  }

  /** Blocks [c0, c1) read into a fresh arena buffer (the caller releases it). */
  private async readChunk(view: View, c0: number, c1: number): Promise<number> {
    const ptr = await this.core.arena.acquire((c1 - c0) * BS);
    try { await this.readBlocks(view, c0, c1, ptr); } catch (e) { this.core.arena.release(ptr); throw e; }
    return ptr;
  }

  async write(offset: number, data: Uint8Array, opts: { fua?: boolean } = {}): Promise<void> {
    this.check(offset, data.length, 'write');
    if (data.length === 0) return;
    this.stats.writes++; this.stats.writeBytes += data.length;
    const b0 = Math.floor(offset / BS), b1 = Math.ceil((offset + data.length) / BS);
    const unlock = await this.locks.acquire(b0, b1, true);
    try {
      await this.striped(b0, b1, true, () => this.writeLocked(offset, data.length, data));
      if (opts.fua) await this.syncFiles();
    } finally { unlock(); }
  }

  /**
   * Zeroes a range; whole blocks become ZERO (no data), partial ones are
   * rewritten. `noHole` writes real zero blocks instead (allocated, so block
   * status does not report a hole).
   */
  async writeZeroes(offset: number, length: number, opts: { fua?: boolean; noHole?: boolean } = {}): Promise<void> {
    this.check(offset, length, 'write zeroes');
    if (length === 0) return;
    this.stats.trims++;
    const b0 = Math.floor(offset / BS), b1 = Math.ceil((offset + length) / BS);
    const unlock = await this.locks.acquire(b0, b1, true);
    try {
      await this.striped(b0, b1, true, () => this.zeroLocked(offset, length, opts));
    } finally { unlock(); }
  }

  private async zeroLocked(offset: number, length: number, opts: { fua?: boolean; noHole?: boolean }): Promise<void> {
    {
      const f0 = Math.ceil(offset / BS), f1 = Math.floor((offset + length) / BS);
      if (f0 >= f1 || opts.noHole) {
        await this.writeLocked(offset, length, null);
        if (opts.fua) await this.syncFiles();
        return;
      }
      if (offset < f0 * BS) await this.writeLocked(offset, f0 * BS - offset, null);
      if (f1 * BS < offset + length) await this.writeLocked(f1 * BS, offset + length - f1 * BS, null);
      const ov = this.cur;
      const w = this.core.heap.wasm;
      // Only blocks this overlay holds data for need a hole (a first discard
      // of a fresh device has none: a record is all it takes).
      let holds = false;
      for (let b = f0; b < f1 && !holds; b = w.runEnd(ov.table, b, f1)) holds = w.stateGet(ov.table, b) === S.DIRTY;
      // Write-ahead: the record is on disk before the hole is punched. A
      // crash before the punch leaves the old data (allocated, so recovery
      // takes it over the record); a hole without its record would read as
      // the template after a restart, neither old nor new. Readers of these
      // blocks are excluded by the lock, so ZERO is published last.
      if (ov.zsync) {
        this.appendZeroRecord(ov, f0, f1 - f0);
        crashPoint('zero.journaled');
        if (holds) await ov.zsync.sync().catch((e: Error) => { this.lostWriteback(e); throw this.writebackError; });
        crashPoint('zero.synced');
      }
      if (holds) await this.core.uring.punch(ov.fd, f0 * BS, (f1 - f0) * BS);
      crashPoint('zero.punched');
      this.core.heap.wasm.stateFill(ov.table, f0, f1 - f0, S.ZERO);
      if (opts.fua) await this.syncFiles();
    }
  }

  /** Appends a zero journal record for blocks [b0, b0+n) (durable devices; the caller syncs). */
  private appendZeroRecord(ov: Overlay, b0: number, n: number): void {
    const rec = Buffer.alloc(16);
    rec.writeBigUInt64LE(BigInt(b0), 0);
    rec.writeBigUInt64LE(BigInt(n), 8);
    fs.writeSync(ov.zfd, rec, 0, 16, ov.zlen);
    ov.zlen += 16;
  }

  /** Trim: strata guarantees trimmed ranges read back as zeros. */
  trim(offset: number, length: number): Promise<void> { return this.writeZeroes(offset, length); }

  /** Makes every completed write durable in the local overlay. */
  async flush(): Promise<void> {
    this.ensureOpen();
    this.stats.flushes++;
    await this.syncFiles();
  }

  /**
   * Ranges of [offset, offset+length) that read as zeros without data
   * (overlay ZERO or a zero extent with nothing written over it), for NBD
   * block status. Adjacent ranges with the same answer are merged.
   */
  zeroMap(offset: number, length: number): Extent2[] {
    this.check(offset, length, 'block status');
    const out: Extent2[] = [];
    const push = (o: number, l: number, zero: boolean) => {
      const last = out[out.length - 1];
      if (last && last.zero === zero && last.offset + last.length === o) last.length += l;
      else out.push({ offset: o, length: l, zero });
    };
    const b0 = Math.floor(offset / BS), b1 = Math.ceil((offset + length) / BS);
    this.core.planner.plan(this.rec, b0, b1, BS, (kind, _ref, _off, len, dst) => push(b0 * BS + dst, len, kind === SegKind.Zero));
    // Clip to the request.
    if (out.length) {
      const first = out[0];
      const cut = offset - first.offset; first.offset += cut; first.length -= cut;
      const last = out[out.length - 1];
      last.length = offset + length - last.offset;
    }
    return out;
  }

  /** Warms the template cache for a range (NBD CACHE). */
  async prefetch(offset: number, length: number): Promise<void> {
    this.check(offset, length, 'prefetch');
    const base = this.base;
    const jobs: Promise<void>[] = [];
    const b0 = Math.floor(offset / BS), b1 = Math.ceil((offset + length) / BS);
    // Only what the device reads from its layers (not what its overlays hold).
    this.core.planner.plan(this.rec, b0, b1, BS, (kind, ref, off, len) => {
      if (kind === SegKind.Layer) jobs.push(base.caches.get(ref)!.ensure(off, len));
    });
    await Promise.all(jobs);
  }

  // ------------------------------------------------------------ snapshots

  /**
   * Turns everything written so far into a new layer and rebases the device
   * onto it. The snapshot point is the call: the device-wide lock is queued
   * right here, so requests issued before the call are in the snapshot and
   * requests issued after it are not. The lock is held only to swap in a
   * fresh overlay; the upload runs while the device keeps serving, reading
   * through the frozen overlay. Snapshots taken while an earlier one uploads
   * freeze at once too and upload in order, each on top of the previous.
   */
  snapshot(opts: SnapshotOptions = {}): Promise<SnapshotResult> {
    this.ensureOpen();
    // After a lost writeback the overlay may read back stale bytes once its pages are evicted.
    if (this.writebackError) return Promise.reject(this.writebackError);
    const t0 = performance.now();
    const lock = this.locks.acquire(0, this.blocks, true);
    const prev = this.lastSnapshot;
    const run = (async () => {
      const unlock = await lock;
      const ov = this.cur;
      try {
        await this.gated(true, () => {
          this.cur = this.newOverlay();
          crashPoint('freeze.created');
          this.frozen.push(ov);
          this.publish();
          this.saveManifest();
          crashPoint('freeze.saved');
        });
      } finally { unlock(); }
      const frozenMs = performance.now() - t0;
      opts.onFrozen?.();
      await prev.catch(() => {});
      if (!this.frozen.includes(ov)) {
        throw new StrataError('EIO', 'an earlier snapshot of this device failed; its changes and these are kept in the device');
      }
      return this.upload(ov, opts, frozenMs);
    })();
    this.lastSnapshot = run.catch(() => {});
    return run;
  }

  private upload(ov: Overlay, opts: SnapshotOptions, frozenMs: number): Promise<SnapshotResult> {
    return traced('strata.snapshot', { 'strata.device': this.id, 'strata.layer': this.layerId }, () => this.uploadUntraced(ov, opts, frozenMs));
  }

  private async uploadUntraced(ov: Overlay, opts: SnapshotOptions, frozenMs: number): Promise<SnapshotResult> {
    try {
      const { dataRuns, zeroRuns } = this.changedRuns(ov);
      const parent = this.base.header;
      // A chain about to grow past its limit is compacted (src/compaction.ts).
      const keep = compactionPlan(parent, this.opts.maxChain ?? MAX_CHAIN_DEFAULT);
      if (keep) dataRuns.push(...await copyUp(this.core, parent, this.base.caches, keep, ov.table, ov.fd));
      const { header, stats } = await writeLayer(this.core, this.registry, {
        virtualSize: this.size, parent, codec: opts.codec ?? this.opts.codec ?? parent.codec, level: opts.level,
        fd: ov.fd, dataRuns, zeroRuns, seed: true, onProgress: opts.onProgress, keep: keep ?? undefined,
      });
      crashPoint('upload.stored');
      // Rebase: the new layer holds exactly base + this overlay, and its
      // frames are already in the local cache, so reads switch without
      // fetching. Readers that started earlier keep their pinned view (H14).
      const newBase = await resolveBase(this.core, this.registry, header);
      const oldBase = this.base;
      await this.gated(true, () => {
        this.base = newBase;
        this.frozen.splice(this.frozen.indexOf(ov), 1);
        this.publish();
        this.saveManifest();
      });
      crashPoint('upload.rebased');
      ov.pin.retire();
      oldBase.pin.retire();
      this.stats.snapshots++;
      await this.opts.onSnapshot?.(this, header);
      return { id: header.chain[0], header, stats, frozenMs };
    } catch (e) {
      await this.foldBack();
      throw e;
    }
  }

  /** Runs of DIRTY and ZERO blocks in an overlay. */
  private changedRuns(ov: Overlay): { dataRuns: BlockRun[]; zeroRuns: Array<{ devBlock: number; count: number }> } {
    const w = this.core.heap.wasm;
    const dataRuns: BlockRun[] = [], zeroRuns: Array<{ devBlock: number; count: number }> = [];
    for (let b = 0; b < this.blocks;) {
      const e = w.runEnd(ov.table, b, this.blocks);
      const st = w.stateGet(ov.table, b);
      if (st === S.DIRTY) dataRuns.push({ devBlock: b, count: e - b, fileBlock: b });
      else if (st === S.ZERO) zeroRuns.push({ devBlock: b, count: e - b });
      b = e;
    }
    return { dataRuns, zeroRuns };
  }

  /**
   * A failed snapshot puts every frozen overlay's changes back under the
   * newer ones (newest first, filling only blocks nothing newer wrote): no
   * write is lost. Later snapshots that froze in the meantime then fail too.
   */
  private async foldBack(): Promise<void> {
    const unlock = await this.locks.acquire(0, this.blocks, true);
    try {
      await this.gated(true, () => this.foldBackLocked());
    } finally { unlock(); }
  }

  private async foldBackLocked(): Promise<void> {
    {
      const w = this.core.heap.wasm;
      const cur = this.cur;
      for (let lv = this.frozen.length - 1; lv >= 0; lv--) {
        const fz = this.frozen[lv];
        for (let b = 0; b < this.blocks;) {
          const e = w.runEnd(fz.table, b, this.blocks);
          const st = w.stateGet(fz.table, b);
          if (st !== S.ABSENT) {
            for (let x = b; x < e;) {
              const xe = w.runEnd(cur.table, x, e);
              if (w.stateGet(cur.table, x) === S.ABSENT) {
                // cur holds no data here (ABSENT), so a ZERO run needs only its record.
                if (st === S.DIRTY) await this.copyBlocks(fz.fd, cur.fd, x, xe);
                else if (cur.zsync) this.appendZeroRecord(cur, x, xe - x);
                w.stateFill(cur.table, x, xe - x, st);
              }
              x = xe;
            }
          }
          b = e;
        }
      }
      // What was copied must be on disk before the manifest stops naming
      // the frozen overlays it came from (their files go right after).
      if (this.opts.durable && this.frozen.length) await this.syncFiles();
      crashPoint('fold.copied');
      const folded = this.frozen.splice(0);
      this.publish();
      this.saveManifest();
      crashPoint('fold.saved');
      for (const fz of folded) fz.pin.retire();
    }
  }

  private async copyBlocks(from: number, to: number, b0: number, b1: number): Promise<void> {
    for (let c = b0; c < b1; c += CHUNK_BLOCKS) {
      const n = Math.min(CHUNK_BLOCKS, b1 - c);
      const ptr = await this.core.arena.acquire(n * BS);
      try {
        await this.core.uring.readFull(from, c * BS, n * BS, ptr);
        await this.core.uring.writeFull(to, c * BS, n * BS, ptr);
      } finally { this.core.arena.release(ptr); }
    }
  }

  // --------------------------------------------------------------- close

  /** Waits for in-flight requests, then drops the overlay (its changes are gone unless snapshotted). */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.lastSnapshot;
    const unlock = await this.locks.acquire(0, this.blocks, true);
    this.closed = true;
    await this.ioGate?.close();
    unlock();
    if (this.opts.durable && !this.keepFiles) fs.rmSync(manifestPath(this.dir, this.id), { force: true });
    this.cur.pin.retire();
    for (const fz of this.frozen.splice(0)) fz.pin.retire();
    this.base.pin.retire();
    this.rec.retire();
  }

  // -------------------------------------------------------- the I/O workers' gate

  /**
   * The device's gate and stripes shared with the I/O workers: they then
   * serve reads and writes of blocks whose place is known without the
   * engine, and hand everything else back to this device (see
   * device-gate.ts).
   */
  gate(): DeviceGate {
    this.ensureOpen();
    if (!this.ioGate) {
      const gate = new DeviceGate(this.core.heap, this.size, BS);
      this.ioGate = gate;
      void gate.gated(true, () => this.publish());
    }
    return this.ioGate;
  }

  /** What an I/O worker needs to serve this device's requests: the workers and its gate record. */
  ioTarget(): { workers: IoWorkers; gate: number } {
    return { workers: this.core.io(), gate: this.gate().ptr };
  }

  /** What the I/O workers served without the engine (zeros while none serves the device). */
  nativeStats(): GateStats {
    return this.ioGate?.stats() ?? { fastReads: 0, fastWrites: 0, slowPlans: 0, readBytes: 0, writeBytes: 0 };
  }

  /** Keeps native requests out (waiting for those in flight) until the returned function is called. */
  holdNatives(): Promise<() => void> {
    return this.ioGate ? this.ioGate.hold() : Promise.resolve(() => {});
  }

  /** Runs fn with natives kept off blocks [b0, b1) (engine data requests). */
  private striped<T>(b0: number, b1: number, exclusive: boolean, fn: () => T | Promise<T>): Promise<T> {
    return this.ioGate ? this.ioGate.striped(b0 * BS, (b1 - b0) * BS, exclusive, fn) : settle(fn);
  }

  private gated<T>(writer: boolean, fn: () => T | Promise<T>): Promise<T> {
    return this.ioGate ? this.ioGate.gated(writer, fn) : settle(fn);
  }

  /**
   * Tells the planner the current view: a new record (the engine's requests
   * under way keep the one they pinned; the I/O workers move to it at once);
   * only inside gated(true, ...) once the workers serve the device.
   */
  private publish(): void {
    const base = this.base;
    const old = this.rec as ViewRecord | undefined;
    this.rec = new ViewRecord(this.core.heap, {
      cur: this.cur, frozen: this.frozen, ext: base.map.ptr, nExt: base.map.extents.length,
      layers: base.header.chain.map((_, i) => base.caches.get(i)?.nativeView() ?? null),
    });
    // The workers are drained (the gate is held) and move to the new record at once.
    this.ioGate?.publish(this.rec.ptr);
    old?.retire();
  }

  /**
   * Durable devices: waits for in-flight requests and uploads, makes every
   * write durable and lets go of the device while keeping its files, for
   * Engine.resumeDevice() in this or a later process.
   */
  async suspend(): Promise<void> {
    if (!this.opts.durable) throw einval(`device ${this.id} is not durable`);
    if (this.closed) return;
    await this.lastSnapshot;
    // Kept (and closed) also when its writes did not reach the disk: the
    // manifest then says so and resume() refuses it.
    const synced = await this.syncFiles().then(() => null, (e: Error) => e);
    this.saveManifest();
    this.keepFiles = true;
    await this.close();
    if (synced) throw synced;
  }

  // ------------------------------------------------------------ internals

  private check(offset: number, length: number, what: string): void {
    this.ensureOpen();
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw einval(`${what}: bad offset/length ${offset}+${length}`);
    }
    if (offset % SECTOR || length % SECTOR) throw einval(`${what}: ${offset}+${length} is not ${SECTOR}-byte aligned`);
    if (offset + length > this.size) {
      throw new StrataError(what === 'write' || what === 'write zeroes' ? 'ENOSPC' : 'EINVAL',
        `${what}: ${offset}+${length} is beyond the device size ${this.size}`);
    }
  }

  private ensureOpen(): void {
    if (this.closed) throw new StrataError('ESHUTDOWN', `device ${this.id} is closed`);
  }

  /**
   * Writes `len` bytes at `offset` (data, or zeros when null) with the range
   * already locked. Partial blocks at either end are read first (RMW).
   */
  private async writeLocked(offset: number, len: number, data: Uint8Array | null): Promise<void> {
    const b0 = Math.floor(offset / BS), b1 = Math.ceil((offset + len) / BS);
    const ov = this.cur;
    const w = this.core.heap.wasm;
    for (let c0 = b0; c0 < b1; c0 += CHUNK_BLOCKS) {
      const c1 = Math.min(b1, c0 + CHUNK_BLOCKS);
      const ptr = await this.core.arena.acquire((c1 - c0) * BS);
      try {
        const from = Math.max(offset, c0 * BS), to = Math.min(offset + len, c1 * BS);
        if (from > c0 * BS || to < c1 * BS) {
          const view = this.pinView();
          try {
            const jobs: Promise<void>[] = [];
            if (from > c0 * BS) jobs.push(this.readBlocks(view, c0, c0 + 1, ptr));
            if (to < c1 * BS && (c1 - 1 > c0 || from === c0 * BS)) jobs.push(this.readBlocks(view, c1 - 1, c1, ptr + (c1 - 1 - c0) * BS));
            await Promise.all(jobs);
          } finally { this.unpinView(view); }
        }
        const u8 = this.core.heap.u8;
        if (data) u8.set(data.subarray(from - offset, to - offset), ptr + from - c0 * BS);
        else this.core.heap.wasm.zeroFill(ptr + from - c0 * BS, to - from);
        await this.core.uring.writeFull(ov.fd, c0 * BS, (c1 - c0) * BS, ptr);
        // Publish only after the bytes are in the file: a failed write leaves
        // the old state (the caller gets the error, nothing is half-applied).
        w.stateFill(ov.table, c0, c1 - c0, S.DIRTY);
      } finally { this.core.arena.release(ptr); }
    }
  }

  /** Fills [ptr, ...) with blocks [b0, b1) as the view sees them (planned in WASM: assembly/plan.ts). */
  private readBlocks(view: View, b0: number, b1: number, ptr: number): Promise<void> {
    const jobs: Promise<void>[] = [];
    const w = this.core.heap.wasm;
    this.core.planner.plan(view.rec, b0, b1, BS, (kind, ref, off, len, dst) => {
      if (kind === SegKind.File) jobs.push(this.readFile(ref, off, len, ptr + dst));
      else if (kind === SegKind.Zero) w.zeroFill(ptr + dst, len);
      else jobs.push(view.base.caches.get(ref)!.read(off, len, ptr + dst));
    });
    return jobs.length === 1 ? jobs[0] : Promise.all(jobs).then(() => undefined);
  }

  private async readFile(fd: number, off: number, len: number, ptr: number): Promise<void> {
    const got = await this.core.uring.readFull(fd, off, len, ptr);
    if (got < len) this.core.heap.wasm.zeroFill(ptr + got, len - got);
  }

  // The kernel reports a writeback error to each open file once (errseq):
  // a second fsync would succeed although acknowledged writes never reached
  // the disk. So the first failure sticks: every later flush, FUA write and
  // snapshot of this device fails with EIO.
  private async syncFiles(): Promise<void> {
    if (this.writebackError) throw this.writebackError;
    // Pinned: an upload finishing meanwhile retires (closes) a frozen
    // overlay, and its fd number may be reused by another file.
    const ovs = [this.cur, ...this.frozen];
    for (const o of ovs) o.pin.pin();
    try {
      const jobs: Promise<unknown>[] = ovs.map((o) => this.core.uring.fsync(o.fd));
      for (const o of ovs) if (o.zsync) jobs.push(o.zsync.sync());
      await Promise.all(jobs);
    } catch (e) {
      this.lostWriteback(e as Error);
      throw this.writebackError;
    } finally {
      for (const o of ovs) o.pin.unpin();
    }
  }

  private lostWriteback(cause: Error): void {
    if (this.writebackError) return;
    this.writebackError = new StrataError('EIO',
      `device ${this.id}: writing its overlay back to disk failed (${cause.message}); writes acknowledged before it may be lost, so this device's flushes and snapshots fail from now on`,
      { cause });
    try { this.saveManifest(); } catch { /* the same disk may refuse it: the device still fails every flush */ }
  }

  private pinView(): View {
    const v: View = { cur: this.cur, frozen: this.frozen.slice(), base: this.base, rec: this.rec };
    v.cur.pin.pin(); for (const f of v.frozen) f.pin.pin(); v.base.pin.pin(); v.rec.pin();
    return v;
  }

  private unpinView(v: View): void {
    v.cur.pin.unpin(); for (const f of v.frozen) f.pin.unpin(); v.base.pin.unpin(); v.rec.unpin();
  }

  private newOverlay(): Overlay {
    const gen = this.gen++;
    const file = overlayPath(this.dir, this.id, gen);
    const fd = fs.openSync(file, 'w+', 0o600);
    fs.ftruncateSync(fd, this.size);
    const zfd = this.opts.durable ? fs.openSync(zerosPath(this.dir, this.id, gen), 'w+', 0o600) : -1;
    // Their size and emptiness are on disk before a manifest names them
    // (saveManifest makes the directory entries durable).
    if (zfd >= 0) { fs.fsyncSync(fd); fs.fsyncSync(zfd); }
    const heap = this.core.heap;
    const table = heap.alloc(this.blocks);
    heap.wasm.stateFill(table, 0, this.blocks, S.ABSENT);
    const keep = { files: () => this.keepFiles };
    return { gen, file, fd, table, zfd, zlen: 0, zsync: zfd >= 0 ? new GroupSync(() => this.core.uring.fsync(zfd)) : null, keep, pin: overlayPin(heap, this.dir, this.id, gen, fd, zfd, table, keep) };
  }
}

const DEVICE_ID = /^[A-Za-z0-9_-]{1,64}$/;
const manifestPath = (dir: string, id: string) => path.join(dir, `${id}.json`);
const overlayPath = (dir: string, id: string, gen: number) => path.join(dir, `${id}.${gen}.overlay`);
const zerosPath = (dir: string, id: string, gen: number) => path.join(dir, `${id}.${gen}.zeros`);

/** Closes an overlay's files and frees its table; deletes the files unless kept. */
function overlayPin(heap: Core['heap'], dir: string, id: string, gen: number, fd: number, zfd: number, table: number, keep: Overlay['keep']): Pinned {
  return new Pinned(() => {
    fs.closeSync(fd);
    if (zfd >= 0) fs.closeSync(zfd);
    if (!keep.files()) { fs.rmSync(overlayPath(dir, id, gen), { force: true }); fs.rmSync(zerosPath(dir, id, gen), { force: true }); }
    heap.free(table);
  });
}

export function readManifest(dir: string, id: string): DeviceManifest {
  if (!DEVICE_ID.test(id)) throw einval(`invalid device id ${JSON.stringify(id)}`);
  let m: DeviceManifest;
  try { m = JSON.parse(fs.readFileSync(manifestPath(dir, id), 'utf8')); } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new StrataError('ENOENT', `no durable device ${id}`);
    throw new StrataError('EBADMSG', `device ${id}: unreadable manifest: ${(e as Error).message}`);
  }
  if (m.version !== 1 || m.id !== id || !Array.isArray(m.gens) || m.gens.length === 0 || !m.gens.every((g) => Number.isInteger(g) && g >= 0) ||
    !Number.isSafeInteger(m.size) || m.size <= 0 || m.size % BS) {
    throw new StrataError('EBADMSG', `device ${id}: invalid manifest`);
  }
  return m;
}

/** Durable devices whose manifests are in `dir`. */
export function listManifests(dir: string): string[] {
  let names: string[];
  try { names = fs.readdirSync(dir); } catch { return []; }
  return names.filter((n) => n.endsWith('.json')).map((n) => n.slice(0, -5)).filter((id) => DEVICE_ID.test(id));
}

/** Deletes overlay files of `id` that a crash left and the manifest does not name (a freeze or fold-back cut short). */
function sweepOrphans(dir: string, id: string, gens: number[]): void {
  const re = new RegExp(`^${id}\\.(\\d+)\\.(overlay|zeros)$`);
  for (const name of fs.readdirSync(dir)) {
    const m = re.exec(name);
    if (m && !gens.includes(Number(m[1]))) fs.rmSync(path.join(dir, name), { force: true });
  }
}

/** Rebuilds an overlay's state table from its files (see Device.resume). */
function recoverOverlay(core: Core, dir: string, id: string, gen: number, size: number): Overlay {
  const file = overlayPath(dir, id, gen);
  let fd: number;
  try { fd = fs.openSync(file, 'r+'); } catch { throw new StrataError('EBADMSG', `device ${id}: overlay ${gen} is missing`); }
  const zfd = fs.openSync(zerosPath(dir, id, gen), fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
  const heap = core.heap;
  const blocks = size / BS;
  const table = heap.alloc(blocks);
  let zlen = 0;
  try {
    if (fs.fstatSync(fd).size !== size) throw new StrataError('EBADMSG', `device ${id}: overlay ${gen} has the wrong size`);
    heap.wasm.stateFill(table, 0, blocks, S.ABSENT);
    const journal = fs.readFileSync(zerosPath(dir, id, gen));
    zlen = journal.length - (journal.length % 16); // a torn last record was never acknowledged
    for (let at = 0; at < zlen; at += 16) {
      const b0 = Number(journal.readBigUInt64LE(at)), n = Number(journal.readBigUInt64LE(at + 8));
      if (b0 + n > blocks) throw new StrataError('EBADMSG', `device ${id}: zero journal ${gen} is corrupt`);
      heap.wasm.stateFill(table, b0, n, S.ZERO);
    }
    const ext = loadNative().dataExtents(fd, size);
    for (let i = 0; i < ext.length; i += 2) {
      const b0 = Math.floor(ext[i] / BS), b1 = Math.ceil(ext[i + 1] / BS);
      heap.wasm.stateFill(table, b0, b1 - b0, S.DIRTY);
    }
  } catch (e) {
    fs.closeSync(fd); fs.closeSync(zfd); heap.free(table);
    throw e;
  }
  // Until a device adopts it (a failed resume), a recovered overlay's files are kept.
  const keep = { files: () => true };
  return { gen, file, fd, table, zfd, zlen, zsync: new GroupSync(() => core.uring.fsync(zfd)), keep, pin: overlayPin(heap, dir, id, gen, fd, zfd, table, keep) };
}

/** fn's result as a promise (a throw becomes a rejection): no I/O workers to coordinate with. */
function settle<T>(fn: () => T | Promise<T>): Promise<T> {
  try { return Promise.resolve(fn()); } catch (e) { return Promise.reject(e); }
}

async function resolveBase(core: Core, registry: LayerRegistry, header: LayerHeader): Promise<Base> {
  const caches = await registry.referenced(header);
  const map = new MappingTable(core.heap, header.extents);
  return { header, map, caches, pin: new Pinned(() => { map.free(); registry.release(caches.values()); }) };
}
