// Finds layers in the object store: verified headers (cached), the per-layer
// local caches, and the dedup fingerprint indexes.
import type { Core } from './core';
import { decodeHeader, ID_RE, keys, MAX_HEADER, type LayerHeader } from './format';
import { LayerCache } from './layer-cache';
import { einval, StrataError } from './errors';
import { decodeIndex, type Fingerprint } from './fingerprint';

export class LayerRegistry {
  private headers = new Map<string, Promise<LayerHeader>>();
  private caches = new Map<string, LayerCache>();
  private indexes = new Map<string, Promise<Fingerprint[]>>();

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

  /** Headers of every layer the mapping of `h` references, by chain index. */
  async referenced(h: LayerHeader): Promise<Map<number, LayerCache>> {
    const used = new Set<number>();
    for (const e of h.extents) if (e.layer !== 0xffffffff) used.add(e.layer);
    const out = new Map<number, LayerCache>();
    await Promise.all([...used].map(async (i) => { out.set(i, await this.cache(h.chain[i])); }));
    return out;
  }

  index(id: string): Promise<Fingerprint[]> {
    let p = this.indexes.get(id);
    if (!p) {
      p = this.core.store.get(keys.index(id)).then((b) => decodeIndex(b, (x) => this.core.checksum(x), id));
      this.indexes.set(id, p);
      p.catch(() => this.indexes.delete(id));
    }
    return p;
  }

  stats() {
    const s = { fetches: 0, fetchBytes: 0, fetchErrors: 0, hits: 0, evictions: 0, evictedBytes: 0, restoredFrames: 0, restoredBytes: 0, restoreFailures: 0, scrubbed: 0, scrubFailures: 0, cachedBytes: 0 };
    for (const c of this.caches.values()) {
      for (const k of Object.keys(c.stats) as Array<keyof LayerCache['stats']>) s[k] += c.stats[k];
      s.cachedBytes += c.cachedBytes;
    }
    return s;
  }

  /** Every layer cache open now. */
  allCaches(): LayerCache[] { return [...this.caches.values()]; }

  /** Drops everything cached about a deleted layer (header, cache file, index). */
  forget(id: string): void {
    this.caches.get(id)?.destroy();
    this.caches.delete(id);
    this.headers.delete(id);
    this.indexes.delete(id);
  }

  /** Closes every cache, keeping their files for the next process. */
  async closeAll(): Promise<void> {
    const all = [...this.caches.values()];
    this.caches.clear();
    await Promise.all(all.map((c) => c.close()));
  }
}
