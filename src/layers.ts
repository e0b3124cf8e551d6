// Finds layers in the object store: verified headers (cached), the per-layer
// local caches, and the dedup fingerprint indexes.
import type { Core } from './core';
import { decodeHeader, ID_RE, keys, MAX_HEADER, type LayerHeader } from './format';
import { LayerCache, newCacheStats, removeCacheFiles, type CacheStats } from './layer-cache';
import { einval, StrataError } from './errors';
import * as fs from 'fs';
import * as path from 'path';
import { LayerIndex, type Fingerprint, type Location } from './fingerprint';

/** Layers whose index directory stays in memory (least recently used ones go). */
const INDEXES_KEPT = 64;
/** A lookup touching more buckets of one index than this downloads the whole index to the cache directory instead. */
const RANGED_BUCKETS_MAX = 256;

export class LayerRegistry {
  private headers = new Map<string, Promise<LayerHeader>>();
  private caches = new Map<string, LayerCache>();
  /** How many device views (bases) use each cache: one no view uses is closed (its files stay). */
  private refs = new Map<string, number>();
  private closing = new Map<string, Promise<void>>();
  private closedStats = newCacheStats();
  private indexes = new Map<string, Promise<LayerIndex>>();

  constructor(private readonly core: Core) {}

  header(id: string): Promise<LayerHeader> {
    if (!ID_RE.test(id)) return Promise.reject(einval(`invalid layer id ${JSON.stringify(id)}`));
    let p = this.headers.get(id);
    if (!p) {
      p = this.load(id);
      this.headers.set(id, p);
      p.catch(() => this.headers.delete(id));
    }
    return p;
  }

  private async load(id: string): Promise<LayerHeader> {
    const head = await this.core.store.head(keys.header(id));
    if (!head) throw new StrataError('ENOENT', `layer ${id} not found (no header: missing or never completed)`);
    // Refuse before reading: a huge object must not be pulled into memory.
    if (head.size > MAX_HEADER) throw new StrataError('EBADMSG', `layer ${id} header is ${head.size} bytes, over the ${MAX_HEADER}-byte limit`);
    const buf = await this.core.store.get(keys.header(id));
    const h = decodeHeader(buf, (b) => this.core.checksum(b), `layer ${id} header`);
    if (h.chain[0] !== id) throw new StrataError('EBADMSG', `layer ${id} header names itself ${h.chain[0]}`);
    return h;
  }

  /** Registers a header produced in this process (it was just written). */
  remember(h: LayerHeader): void { this.headers.set(h.chain[0], Promise.resolve(h)); }

  async cache(id: string): Promise<LayerCache> {
    await this.closing.get(id); // one LayerCache per file at a time
    let c = this.caches.get(id);
    if (!c) {
      const h = await this.header(id);
      c = this.caches.get(id); // another caller may have won the race
      if (!c) { c = new LayerCache(this.core, h); this.caches.set(id, c); }
    }
    return c;
  }

  /** Takes over the cache file a layer writer filled while writing `h` (`sums`: its frames' uncompressed xxh64). */
  adoptSeeded(h: LayerHeader, sums: bigint[]): LayerCache {
    const c = new LayerCache(this.core, h, sums);
    this.caches.set(h.chain[0], c);
    this.remember(h);
    return c;
  }

  /**
   * The caches of every layer the mapping of `h` references, by chain index,
   * held for a device view until `release()`: a long-lived device that
   * snapshots every minute must not keep a cache (two files, its tables) open
   * for every layer it ever read through.
   */
  async referenced(h: LayerHeader): Promise<Map<number, LayerCache>> {
    const used = new Set<number>();
    for (const e of h.extents) if (e.layer !== 0xffffffff) used.add(e.layer);
    const out = new Map<number, LayerCache>();
    await Promise.all([...used].map(async (i) => { out.set(i, await this.cache(h.chain[i])); }));
    for (const c of out.values()) this.refs.set(c.id, (this.refs.get(c.id) ?? 0) + 1);
    return out;
  }

  /** A device view is done with these caches (see referenced()). */
  release(caches: Iterable<LayerCache>): void {
    for (const c of caches) {
      const n = (this.refs.get(c.id) ?? 1) - 1;
      if (n > 0) { this.refs.set(c.id, n); continue; }
      this.refs.delete(c.id);
      if (this.caches.get(c.id) !== c) continue;
      this.caches.delete(c.id);
      for (const k of Object.keys(c.stats) as Array<keyof CacheStats>) this.closedStats[k] += c.stats[k]; // counters stay monotonic
      const p = c.close().catch(() => {}).finally(() => { if (this.closing.get(c.id) === p) this.closing.delete(c.id); });
      this.closing.set(c.id, p);
    }
  }

  /** A layer's dedup index (its directory in memory, bounded: see LayerIndex). */
  index(id: string): Promise<LayerIndex> {
    let p = this.indexes.get(id);
    if (p) { this.indexes.delete(id); this.indexes.set(id, p); return p; } // most recently used last
    p = (async () => {
      const idx = await LayerIndex.open(this.core.store, keys.index(id), id, (x) => this.core.checksum(x));
      const local = this.indexFile(id);
      if (fs.existsSync(local) && fs.statSync(local).size === idx.bytes) idx.useLocalCopy(local);
      return idx;
    })();
    this.indexes.set(id, p);
    p.catch(() => this.indexes.delete(id));
    while (this.indexes.size > INDEXES_KEPT) this.indexes.delete(this.indexes.keys().next().value!);
    return p;
  }

  private indexFile(id: string): string { return path.join(this.core.cacheDir, 'layers', `${id}.index`); }

  /**
   * Where each fingerprint's bytes are already stored in `chain` (nearest
   * layer first; chain index i is Location.layer i + 1, as in a child of
   * that chain). Reads only the index buckets the fingerprints fall in; a
   * lookup that would touch most of an index takes a local copy of it once.
   */
  async lookup(chain: readonly string[], fps: Fingerprint[]): Promise<Array<Location | undefined>> {
    const out: Array<Location | undefined> = new Array(fps.length);
    let rest = fps.map((_, i) => i);
    for (let j = 0; j < chain.length && rest.length; j++) {
      const idx = await this.index(chain[j]);
      const want = rest.map((i) => fps[i]);
      if (idx.bucketsFor(want) > RANGED_BUCKETS_MAX) await this.localCopy(chain[j], idx);
      const blocks = await idx.lookup(want);
      const next: number[] = [];
      rest.forEach((i, k) => { if (blocks[k] >= 0) out[i] = { layer: j + 1, data: blocks[k] * 4096 }; else next.push(i); });
      rest = next;
    }
    return out;
  }

  private async localCopy(id: string, idx: LayerIndex): Promise<void> {
    const file = this.indexFile(id);
    if (fs.existsSync(file) && fs.statSync(file).size === idx.bytes) return;
    const bytes = await this.core.store.get(keys.index(id));
    if (bytes.length !== idx.bytes) return; // changed under us: keep reading ranges
    const tmp = `${file}.tmp`;
    fs.writeFileSync(tmp, bytes, { mode: 0o600 });
    fs.renameSync(tmp, file);
    idx.useLocalCopy(file); // every bucket read from it is still checked against the directory
  }

  stats() {
    const s = { ...this.closedStats, cachedBytes: 0 };
    for (const c of this.caches.values()) {
      for (const k of Object.keys(c.stats) as Array<keyof CacheStats>) s[k] += c.stats[k];
      s.cachedBytes += c.cachedBytes;
    }
    return s;
  }

  /** Every layer cache open now. */
  allCaches(): LayerCache[] { return [...this.caches.values()]; }

  /** Drops everything cached about a deleted layer (header, cache file, index). */
  forget(id: string): void {
    const c = this.caches.get(id);
    if (c) c.destroy();
    else {
      // Not open (or closing): its files may still be on disk.
      const rm = () => removeCacheFiles(this.core.cacheDir, id);
      const closing = this.closing.get(id);
      if (closing) void closing.then(rm); else rm();
    }
    this.refs.delete(id);
    fs.rmSync(this.indexFile(id), { force: true });
    this.caches.delete(id);
    this.headers.delete(id);
    this.indexes.delete(id);
  }

  /** Closes every cache, keeping their files for the next process. */
  async closeAll(): Promise<void> {
    const all = [...this.caches.values()];
    this.caches.clear();
    this.refs.clear();
    await Promise.all([...all.map((c) => c.close()), ...this.closing.values()]);
  }
}
