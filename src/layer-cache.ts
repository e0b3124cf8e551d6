// Local cache of one layer's uncompressed data: a sparse file the size of the
// layer's data plus one state byte per frame in shared memory (ABSENT →
// FETCHING → CACHED). Shared by every device whose chain uses the layer.
// Frames are fetched on first touch, once (single flight), and only marked
// CACHED after the checksum verified and the bytes reached the file (H11,
// H12): a failed or corrupt fetch is neither cached nor served.
//
// The file outlives the process: a journal (cache-journal.ts) names the
// frames whose bytes were synced, with the xxh64 of their uncompressed
// bytes. A later process trusts none of it until used: a frame the journal
// names is read back and hashed on first touch, and fetched from the store
// only when that fails. A scrub re-verifies cached frames in the background.
import * as fs from 'fs';
import * as path from 'path';
import type { Core } from './core';
import { keys, type LayerHeader } from './format';
import { S, layout } from './wasm';
import { ebadmsg, eio, StrataError } from './errors';
import { traced } from './tracing';
import { CacheJournal, RecordKind } from './cache-journal';
import { Priority, type Ticket } from './fetch-queue';

/** Where a layer's cache file and journal live in a cache directory. */
export function cacheFiles(cacheDir: string, id: string): { data: string; journal: string } {
  const base = path.join(cacheDir, 'layers', id);
  return { data: `${base}.cache`, journal: `${base}.journal` };
}

/** Removes a layer's cache files: the journal first, so a crash between the two leaves a file nothing trusts. */
export function removeCacheFiles(cacheDir: string, id: string): void {
  const f = cacheFiles(cacheDir, id);
  fs.rmSync(f.journal, { force: true });
  fs.rmSync(f.data, { force: true });
}

/** A layer cache's counters, zeroed (the registry sums them, also over closed caches). */
export function newCacheStats() {
  return { fetches: 0, fetchBytes: 0, fetchErrors: 0, hits: 0, evictions: 0, evictedBytes: 0, restoredFrames: 0, restoredBytes: 0, restoreFailures: 0, scrubbed: 0, scrubFailures: 0, persistedFrames: 0 };
}
export type CacheStats = ReturnType<typeof newCacheStats>;

/** How long fetched frames wait before one sync makes them durable and journaled. */
const PERSIST_DELAY_MS = 200;

export class LayerCache {
  readonly id: string;
  readonly fd: number;
  readonly file: string;
  private readonly journal: CacheJournal;
  private readonly states: number; // heap offset, one byte per frame
  private readonly framesPtr: number;
  /** heap offset, one byte per frame: set on every read (also by native readers), cleared by the eviction clock. */
  private readonly refs: number;
  /** Frames JS readers are reading right now (never evicted). */
  private readonly pins: Int32Array;
  /** xxh64 of each frame's uncompressed bytes, where known (cached, restored or seeded frames). */
  private readonly sums: BigUint64Array;
  /** Frames an earlier process cached: on disk, not yet verified, not CACHED until they are. */
  private readonly restored = new Set<number>();
  /** Frames cached but not yet synced and journaled. */
  private unpersisted = new Set<number>();
  private persistTimer: NodeJS.Timeout | null = null;
  /** Set by close(): no new background work (prefetch, scrub, profile sampling) starts. */
  private closed = false;
  private scrubbing: Promise<void> = Promise.resolve();
  private persisting: Promise<void> = Promise.resolve();
  private inflight = new Map<number, Promise<void>>();
  /** The fetch-queue ticket of each frame being fetched (promoted when a reader needs it). */
  private tickets = new Map<number, Ticket>();
  /** The last frame a reader missed on (sequential misses start readahead). */
  private lastMiss = -2;
  /** Bytes of frames in the CACHED state, and of restored frames (they hold disk space too). */
  cachedBytes = 0;
  /** The eviction clock's position, and the scrub's. */
  hand = 0;
  private scrubHand = 0;
  stats = newCacheStats();

  /** `seed`: the writer of this new layer filled the cache file; these are its frames' uncompressed sums. */
  constructor(private readonly core: Core, readonly header: LayerHeader, seed?: bigint[]) {
    this.id = header.chain[0];
    const files = cacheFiles(core.cacheDir, this.id);
    this.file = files.data;
    const n = Math.max(1, header.frames.length);
    const journalFile = files.journal;
    this.fd = fs.openSync(this.file, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
    // A file of another size is not this layer's: nothing in it is trusted.
    if (seed || fs.fstatSync(this.fd).size !== header.dataSize) fs.rmSync(journalFile, { force: true });
    if (!seed && fs.fstatSync(this.fd).size !== header.dataSize) fs.ftruncateSync(this.fd, 0);
    fs.ftruncateSync(this.fd, header.dataSize);
    const { journal, cached, skipped } = CacheJournal.open(journalFile, this.id, header.frames.length, (b) => core.checksum(b));
    this.journal = journal;
    if (skipped) this.stats.restoreFailures += skipped;
    this.states = core.heap.alloc(n);
    core.heap.wasm.stateFill(this.states, 0, n, seed ? S.CACHED : S.ABSENT);
    this.framesPtr = core.heap.alloc(n * layout().FRAME_SIZE);
    this.refs = core.heap.alloc(n);
    core.heap.wasm.stateFill(this.refs, 0, n, 0);
    this.pins = new Int32Array(n);
    this.sums = new BigUint64Array(n);
    if (seed) {
      seed.forEach((sum, i) => { this.sums[i] = sum; this.unpersisted.add(i); });
      this.cachedBytes = header.dataSize;
      this.schedulePersist();
    }
    for (const [i, sum] of cached) {
      this.sums[i] = sum;
      this.restored.add(i);
      this.cachedBytes += header.frames[i].uSize;
    }
    header.frames.forEach((f, i) => core.heap.wasm.framePut(this.framesPtr, i, BigInt(f.u), BigInt(f.c), f.uSize, f.cSize, f.checksum));
  }

  /** Frames on disk from an earlier process, not yet verified. */
  get restoredFrames(): number { return this.restored.size; }

  frameOf(dataOff: number): number {
    return this.core.heap.wasm.findFrame(this.framesPtr, this.header.frames.length, BigInt(dataOff));
  }


  /** Makes [dataOff, dataOff+len) present in the cache file, fetching missing frames. */
  async ensure(dataOff: number, len: number): Promise<void> {
    if (dataOff < 0 || dataOff + len > this.header.dataSize) {
      throw ebadmsg(`layer ${this.id}: data range ${dataOff}+${len} beyond ${this.header.dataSize}`);
    }
    const first = this.frameOf(dataOff);
    const last = this.frameOf(dataOff + len - 1);
    if (first < 0 || last < 0) throw ebadmsg(`layer ${this.id}: no frame holds ${dataOff}+${len}`);
    // Wait on every frame the range touches, not just the first (H11); and
    // look again after waiting: a frame being evicted is busy too, and is
    // ABSENT (to be fetched again) when its wait ends.
    for (;;) {
      let waits: Promise<void>[] | undefined;
      let missed: number[] | undefined;
      for (let i = first; i <= last; i++) {
        const w = this.ensureFrame(i);
        if (w) { (waits ??= []).push(w); (missed ??= []).push(i); }
      }
      if (!waits) return;
      // After the demand fetches are queued: readahead never goes first.
      for (const i of missed!) this.missed(i);
      await Promise.all(waits);
    }
  }

  /**
   * Starts fetching frame i in the background (readahead, profile prefetch)
   * unless it is cached or on its way; resolves when it is there, never rejects.
   */
  prefetchFrame(i: number, prio: Priority.Readahead | Priority.Prefetch): Promise<void> {
    if (i < 0 || i >= this.header.frames.length || this.closed) return Promise.resolve();
    return (this.ensureFrame(i, prio) ?? Promise.resolve()).catch(() => {});
  }

  /** undefined when the frame is already cached, else the shared fetch. */
  private ensureFrame(i: number, prio = Priority.Demand): Promise<void> | undefined {
    const w = this.core.heap.wasm;
    const st = w.stateGet(this.states, i);
    if (st === S.CACHED) { if (prio === Priority.Demand) this.stats.hits++; return undefined; }
    const running = this.inflight.get(i);
    if (running) {
      const t = this.tickets.get(i);
      if (t) this.core.fetches.promote(t, prio);
      return running;
    }
    if (w.stateCas(this.states, i, S.ABSENT, S.FETCHING) !== S.ABSENT) {
      if (w.stateGet(this.states, i) === S.CACHED) return undefined;
    }
    const t0 = performance.now();
    // A restored frame's bytes are counted again once it is CACHED.
    const restored = this.restored.delete(i);
    if (restored) this.cachedBytes -= this.header.frames[i].uSize;
    const ticket: Ticket = { prio };
    this.tickets.set(i, ticket);
    const p = traced('strata.fetch', { 'strata.layer': this.id, 'strata.frame': i }, () => this.fetch(i, restored, ticket)).then(
      (local) => {
        this.tickets.delete(i);
        // Publish CACHED before dropping the single-flight entry (H11).
        w.stateSet(this.states, i, S.CACHED);
        this.cachedBytes += this.header.frames[i].uSize;
        this.inflight.delete(i);
        if (!local) { this.unpersisted.add(i); this.schedulePersist(); }
        this.core.observe.fetch((performance.now() - t0) / 1000, true);
        this.core.onCached();
      },
      (e) => {
        this.tickets.delete(i);
        w.stateSet(this.states, i, S.ABSENT);
        this.inflight.delete(i);
        this.stats.fetchErrors++;
        this.core.observe.fetch((performance.now() - t0) / 1000, false);
        throw e instanceof StrataError ? e : eio(`layer ${this.id} frame ${i}: ${(e as Error).message}`, e);
      });
    this.inflight.set(i, p);
    return p;
  }

  /** A demand miss on frame i: the second of two in a row starts fetching the frames after it. */
  private missed(i: number): void {
    const sequential = i === this.lastMiss + 1;
    this.lastMiss = i;
    if (!sequential) return;
    for (let k = 1; k <= this.core.readaheadFrames; k++) void this.prefetchFrame(i + k, Priority.Readahead);
  }

  /** Makes frame i's bytes present in the file; true when they were already there (restored and verified). */
  private async fetch(i: number, restored: boolean, ticket: Ticket): Promise<boolean> {
    const f = this.header.frames[i];
    const c = this.core;
    if (restored) {
      const out = await c.bulk.acquire(f.uSize);
      try {
        if (await this.verify(i, out)) { this.stats.restoredFrames++; this.stats.restoredBytes += f.uSize; return true; }
      } finally { c.bulk.release(out); }
      this.stats.restoreFailures++;
      this.sums[i] = 0n;
    }
    // A store slot first (demand before readahead before prefetch), then the
    // output buffer: the bounded bulk arena also limits how much compressed
    // data sits in memory, however many frames a caller asks for.
    const slot = await c.fetches.acquire(ticket);
    let out = -1, cPtr = -1;
    try {
      const room = c.beforeFetch();
      if (room) await room;
      out = await c.bulk.acquire(f.uSize);
      cPtr = c.heap.alloc(f.cSize);
      // The shared tier first; a frame from it that does not verify is
      // dropped there and fetched from the store instead.
      let fromTier = false;
      let r: { ok: boolean; code?: string; message?: string; uSum?: string } | null = null;
      const shared = c.tier2 ? await c.tier2.get(this.id, f) : null;
      if (shared) {
        c.heap.u8.set(shared, cPtr);
        r = await this.unframe(i, cPtr, out, ticket.prio);
        if (r.ok) fromTier = true;
        else await c.tier2!.discard(this.id, f);
      }
      if (!fromTier) {
        const bytes = await c.store.get(keys.data(this.id), { offset: f.c, length: f.cSize });
        if (bytes.length !== f.cSize) throw ebadmsg(`layer ${this.id} frame ${i}: got ${bytes.length} of ${f.cSize} bytes`);
        c.heap.u8.set(bytes, cPtr);
        r = await this.unframe(i, cPtr, out, ticket.prio);
        if (!r.ok) throw new StrataError(r.code === 'EBADMSG' ? 'EBADMSG' : 'EIO', `layer ${this.id} frame ${i}: ${r.message}`);
        // Written back to the shared tier only now that it verified.
        c.tier2?.put(this.id, f, bytes);
        this.stats.fetchBytes += f.cSize;
      }
      this.sums[i] = BigInt('0x' + r!.uSum);
      await c.uring.writeFull(this.fd, f.u, f.uSize, out);
    } finally {
      if (cPtr >= 0) c.heap.free(cPtr);
      if (out >= 0) c.bulk.release(out);
      slot();
    }
    this.stats.fetches++;
    return false;
  }

  /** Reads frame i from the file into out and compares its hash with the known sum. */
  private async verify(i: number, out: number): Promise<boolean> {
    const f = this.header.frames[i];
    const got = await this.core.uring.readFull(this.fd, f.u, f.uSize, out);
    if (got < f.uSize) this.core.heap.wasm.zeroFill(out + got, f.uSize - got);
    const sum = await this.core.run<string>({ op: 'hash', ptr: out, len: f.uSize });
    return BigInt('0x' + sum) === this.sums[i];
  }

  private schedulePersist(): void {
    if (this.persistTimer || !this.unpersisted.size) return;
    this.persistTimer = setTimeout(() => { this.persistTimer = null; void this.persist(); }, PERSIST_DELAY_MS);
    this.persistTimer.unref();
  }

  /**
   * Makes cached frames durable, then journals them: one sync for every frame
   * cached so far. A frame evicted meanwhile is left out (its DROPPED record
   * may already be written).
   */
  persist(): Promise<void> {
    this.persisting = this.persisting.then(async () => {
      if (!this.unpersisted.size) return;
      const batch = this.unpersisted;
      this.unpersisted = new Set();
      try {
        await this.core.uring.fsync(this.fd);
        const w = this.core.heap.wasm;
        const recs = [...batch].filter((i) => w.stateGet(this.states, i) === S.CACHED)
          .map((i) => ({ kind: RecordKind.Cached, frame: i, sum: this.sums[i] }));
        if (recs.length) {
          this.journal.append(recs);
          // The records too: a host reboot loses unsynced pages, and with them
          // every frame whose record was still in the page cache.
          await this.core.uring.fsync(this.journal.fd);
          this.stats.persistedFrames += recs.length;
        }
      } catch {
        // Not journaled: a later process fetches these frames again.
      }
    });
    return this.persisting;
  }

  /** Verifies (checksum) and decompresses the frame at cPtr into out, in a worker. */
  private unframe(i: number, cPtr: number, out: number, prio: Priority): Promise<{ ok: boolean; code?: string; message?: string; uSum?: string }> {
    const f = this.header.frames[i];
    return this.core.run({ op: 'unframe', codec: this.header.codec, cPtr, cSize: f.cSize, checksum: f.checksum.toString(16), outPtr: out, uSize: f.uSize, prio });
  }

  /** Reads [dataOff, dataOff+len) into ptr, fetching what is missing; the frames are pinned meanwhile. */
  async read(dataOff: number, len: number, ptr: number): Promise<void> {
    const first = this.frameOf(dataOff), last = this.frameOf(dataOff + len - 1);
    // Pinned before the wait: eviction then leaves these frames alone until the bytes are read.
    if (first >= 0 && last >= first) for (let i = first; i <= last; i++) this.pins[i]++;
    try {
      await this.ensure(dataOff, len);
      const w = this.core.heap.wasm;
      for (let i = first; i <= last; i++) w.stateSet(this.refs, i, 1);
      const got = await this.core.uring.readFull(this.fd, dataOff, len, ptr);
      if (got < len) w.zeroFill(ptr + got, len - got);
    } finally {
      if (first >= 0 && last >= first) for (let i = first; i <= last; i++) this.pins[i]--;
    }
  }

  get frameCount(): number { return this.header.frames.length; }

  /** Clears every frame's referenced mark (a boot profile starts recording). */
  clearRefs(): void { this.core.heap.wasm.stateFill(this.refs, 0, Math.max(1, this.header.frames.length), 0); }

  /** Frames read (by any reader, native ones too) since their mark was last cleared. */
  referenced(): number[] {
    if (this.closed) return [];
    const u8 = this.core.heap.u8, out: number[] = [];
    for (let i = 0; i < this.header.frames.length; i++) if (u8[this.refs + i]) out.push(i);
    return out;
  }

  /**
   * One step of the eviction clock at the hand: a frame that is CACHED,
   * unpinned and not referenced since the last pass is a victim (returned);
   * a referenced one gets a second chance.
   */
  clockStep(): number {
    const i = this.hand;
    this.hand = (this.hand + 1) % this.frameCount;
    const w = this.core.heap.wasm;
    if (this.restored.has(i) && !this.inflight.has(i)) return i; // never used by this process
    if (w.stateGet(this.states, i) !== S.CACHED || this.pins[i] > 0) return -1;
    if (w.stateGet(this.refs, i)) { w.stateSet(this.refs, i, 0); return -1; }
    return i;
  }

  /**
   * Evicts frames. `closeGates` keeps native readers out (and waits for those
   * in flight) while the frames leave the CACHED state; the space is then
   * freed with the frames marked busy, so no reader or fetch touches them
   * until they are ABSENT again. Returns the bytes freed.
   */
  async evict(frames: number[], closeGates: () => Promise<() => void>): Promise<number> {
    const w = this.core.heap.wasm;
    const reopen = await closeGates();
    const taken: Array<{ i: number; done: () => void }> = [];
    try {
      for (const i of frames) {
        if (this.pins[i] > 0 || this.inflight.has(i)) continue;
        if (!this.restored.delete(i) && w.stateGet(this.states, i) !== S.CACHED) continue;
        w.stateSet(this.states, i, S.FETCHING);
        let done!: () => void;
        this.inflight.set(i, new Promise<void>((r) => { done = r; }));
        taken.push({ i, done });
      }
    } finally { reopen(); }
    let freed = 0;
    for (const { i, done } of taken) {
      const f = this.header.frames[i];
      try { await this.core.uring.punch(this.fd, f.u, f.uSize); } catch { /* the space stays used; the data is refetched either way */ }
      w.stateSet(this.states, i, S.ABSENT);
      this.sums[i] = 0n;
      this.unpersisted.delete(i);
      this.inflight.delete(i);
      this.cachedBytes -= f.uSize;
      freed += f.uSize;
      this.stats.evictions++;
      this.stats.evictedBytes += f.uSize;
      done();
    }
    try {
      this.journal.append(taken.map(({ i }) => ({ kind: RecordKind.Dropped, frame: i, sum: 0n })));
    } catch { /* a later process reads the hole, which fails verification */ }
    return freed;
  }

  /**
   * Re-verifies the next cached frame (pinned meanwhile) and drops it when
   * its bytes no longer match: returns the bytes read, 0 when no frame is
   * CACHED, or -1 when the frame failed and was dropped.
   */
  scrubNext(closeGates: () => Promise<() => void>): Promise<number> {
    if (this.closed) return Promise.resolve(0);
    const p = this.scrubNextOpen(closeGates);
    this.scrubbing = p.then(() => {}, () => {});
    return p;
  }

  private async scrubNextOpen(closeGates: () => Promise<() => void>): Promise<number> {
    const w = this.core.heap.wasm;
    const n = this.header.frames.length;
    for (let k = 0; k < n; k++) {
      const i = this.scrubHand;
      this.scrubHand = (this.scrubHand + 1) % n;
      if (w.stateGet(this.states, i) !== S.CACHED || this.inflight.has(i) || this.sums[i] === 0n) continue;
      const f = this.header.frames[i];
      const out = await this.core.bulk.acquire(f.uSize);
      this.pins[i]++;
      let ok: boolean;
      try { ok = await this.verify(i, out); } finally { this.pins[i]--; this.core.bulk.release(out); }
      this.stats.scrubbed++;
      if (ok || w.stateGet(this.states, i) !== S.CACHED) return f.uSize;
      this.stats.scrubFailures++;
      await this.evict([i], closeGates);
      return -1;
    }
    return 0;
  }

  /** Where the planner finds this cache (its LAYER record, assembly/layout.ts). */
  nativeView(): { fd: number; states: number; frames: number; nframes: number; refs: number } {
    return { fd: this.fd, states: this.states, frames: this.framesPtr, nframes: this.header.frames.length, refs: this.refs };
  }

  /**
   * Lets go of the cache, keeping its file and journal for the next user
   * (frames cached so far are synced and journaled first). Fetches,
   * evictions and a scrub step under way finish first: they touch its tables.
   */
  async close(): Promise<void> {
    this.closed = true;
    if (this.persistTimer) clearTimeout(this.persistTimer);
    this.persistTimer = null;
    while (this.inflight.size) await Promise.allSettled([...this.inflight.values()]);
    await this.scrubbing;
    await this.persist();
    this.release();
  }

  /** Drops the cache and its files (the layer is gone). */
  destroy(): void {
    this.closed = true;
    if (this.persistTimer) clearTimeout(this.persistTimer);
    this.persistTimer = null;
    this.unpersisted.clear();
    this.release();
    removeCacheFiles(this.core.cacheDir, this.id);
  }

  private release(): void {
    this.journal.close();
    fs.closeSync(this.fd);
    this.core.heap.free(this.states);
    this.core.heap.free(this.framesPtr);
    this.core.heap.free(this.refs);
  }
}
