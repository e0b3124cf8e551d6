// Background re-verification of the local template cache: cached frames are
// read back and hashed at a bounded rate, and any whose bytes no longer match
// are dropped (fetched again on next use). It catches damage that happens
// under a running engine; frames from an earlier process are verified before
// first use anyway (layer-cache.ts).
import type { LayerRegistry } from './layers';

export interface ScrubResult { frames: number; bytes: number; failed: number }

export class CacheScrub {
  private timer: NodeJS.Timeout | null = null;
  private running: Promise<ScrubResult> | null = null;
  private next = 0; // which cache the background scrub continues with

  constructor(private readonly registry: LayerRegistry, private readonly closeGates: (layerId: string) => Promise<() => void>) {}

  /** Scrubs about `bytesPerSec` each second in the background (0: never). */
  start(bytesPerSec: number): void {
    if (this.timer || bytesPerSec <= 0) return;
    this.timer = setInterval(() => { if (!this.running) void this.run(bytesPerSec, false); }, 1000);
    this.timer.unref();
  }

  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    await this.running?.catch(() => {});
  }

  /** One pass: every cached frame of every cache once (`whole`), or up to `maxBytes` from where the last pass stopped. */
  run(maxBytes: number, whole = true): Promise<ScrubResult> {
    const p = (this.running ?? Promise.resolve()).catch(() => {}).then(() => this.pass(maxBytes, whole));
    this.running = p.finally(() => { if (this.running === p) this.running = null; });
    return p;
  }

  private async pass(maxBytes: number, whole: boolean): Promise<ScrubResult> {
    const r: ScrubResult = { frames: 0, bytes: 0, failed: 0 };
    const caches = this.registry.allCaches();
    for (let k = 0; k < caches.length && r.bytes < maxBytes; k++) {
      const c = caches[(this.next + k) % caches.length];
      for (let n = 0; n < c.frameCount && r.bytes < maxBytes; n++) {
        const got = await c.scrubNext(() => this.closeGates(c.id));
        if (got === 0) break; // nothing cached in this layer
        r.frames++;
        if (got < 0) r.failed++; else r.bytes += got;
      }
      if (!whole) this.next = (this.next + k + 1) % caches.length;
    }
    return r;
  }
}
