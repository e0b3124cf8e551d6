// Bounds the local template cache: by size (maxBytes, evicting down to 90%)
// and by disk pressure (keeping minFreeBytes free on the cache's
// filesystem). Victims are chosen by a clock (second-chance LRU) over every
// layer cache's frames; engine reads and native reads both mark frames
// referenced. Frames being read are pinned and never evicted; evicted frames
// are refetched from the object store (which always holds them: a snapshot's
// frames enter the cache only once its layer is committed). Cache files an
// earlier process left for layers not open now ("dormant") count too, and
// go first, least recently used first, whole.
import * as fs from 'fs';
import * as path from 'path';
import type { LayerRegistry } from './layers';
import { removeCacheFiles, type LayerCache } from './layer-cache';

export interface CacheLimits {
  /** Most bytes of cached template data (0 or absent: no size limit). */
  maxBytes?: number;
  /** Evict while the cache filesystem has less free space than this. */
  minFreeBytes?: number;
  /** How often to check (default 250 ms). */
  intervalMs?: number;
  /** Re-verify cached frames in the background at this rate (bytes per second; 0 or absent: never). */
  scrubBytesPerSec?: number;
}

interface Dormant { id: string; bytes: number; mtimeMs: number }

export class CacheEvictor {
  private timer: NodeJS.Timeout | null = null;
  private running: Promise<number> | null = null;
  private dormantBytes = 0;

  constructor(private readonly registry: LayerRegistry, private readonly dir: string, private readonly limits: CacheLimits,
    private readonly closeGates: (layerId: string) => Promise<() => void>) {}

  start(): void {
    if (this.timer) return;
    this.timer = setInterval(() => { void this.run(); }, this.limits.intervalMs ?? 250);
    this.timer.unref();
  }

  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    await this.running;
  }

  /** Cached bytes of open layers, plus the dormant ones as of the last pass. */
  get cachedBytes(): number { return this.registry.allCaches().reduce((n, c) => n + c.cachedBytes, this.dormantBytes); }

  /** Cache files of layers not open in this process, least recently used first. */
  private dormant(): Dormant[] {
    const dir = path.join(this.dir, 'layers');
    const open = new Set(this.registry.allCaches().map((c) => c.id));
    const out: Dormant[] = [];
    let names: string[] = [];
    try { names = fs.readdirSync(dir); } catch { /* no layer caches */ }
    for (const f of names) {
      const m = /^([0-9a-f]{32})\.cache$/.exec(f);
      if (!m || open.has(m[1])) continue;
      try {
        const st = fs.statSync(path.join(dir, f));
        out.push({ id: m[1], bytes: st.blocks * 512, mtimeMs: st.mtimeMs });
      } catch { /* gone meanwhile */ }
    }
    this.dormantBytes = out.reduce((n, d) => n + d.bytes, 0);
    return out.sort((a, b) => a.mtimeMs - b.mtimeMs);
  }

  /** Bytes to free now (0 when within limits). */
  excess(): number {
    let need = 0;
    const max = this.limits.maxBytes ?? 0;
    const used = this.cachedBytes;
    if (max > 0 && used > max) need = used - Math.floor(max * 0.9);
    if (this.limits.minFreeBytes) {
      const st = fs.statfsSync(this.dir);
      const free = st.bavail * st.bsize;
      if (free < this.limits.minFreeBytes) need = Math.max(need, Math.ceil(this.limits.minFreeBytes * 1.1) - free);
    }
    return Math.min(need, used);
  }

  /** One eviction pass (single flight); returns the bytes freed. */
  run(): Promise<number> {
    if (!this.running) this.running = this.pass().finally(() => { this.running = null; });
    return this.running;
  }

  /**
   * A pass that starts now. run() may hand back a pass the timer started
   * earlier, which sized its work before the latest fetches landed; callers
   * that want the limit to hold afterwards (evictNow) wait that one out.
   */
  async runFresh(): Promise<number> {
    await this.running?.catch(() => {});
    return this.run();
  }

  private async pass(): Promise<number> {
    const dormant = this.dormant();
    let need = this.excess();
    if (need <= 0) return 0;
    let freed = 0;
    for (const d of dormant) {
      if (need <= 0) break;
      removeCacheFiles(this.dir, d.id);
      this.dormantBytes -= d.bytes;
      need -= d.bytes;
      freed += d.bytes;
    }
    const caches = this.registry.allCaches().filter((c) => c.frameCount > 0);
    const victims = new Map<LayerCache, number[]>();
    // At most two sweeps of every clock: the first may only clear references.
    let budget = 2 * caches.reduce((n, c) => n + c.frameCount, 0);
    for (let k = 0; need > 0 && budget > 0 && caches.length; k = (k + 1) % caches.length, budget--) {
      const c = caches[k];
      const i = c.clockStep();
      if (i < 0) continue;
      const list = victims.get(c) ?? [];
      if (list.includes(i)) continue;
      list.push(i);
      victims.set(c, list);
      need -= c.header.frames[i].uSize;
    }
    for (const [c, frames] of victims) freed += await c.evict(frames, () => this.closeGates(c.id));
    return freed;
  }
}
