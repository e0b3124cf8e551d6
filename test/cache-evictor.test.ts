// CacheEvictor's passes (src/cache-evictor.ts) over stand-in layer caches:
// evictNow() must leave the cache within its limit even when a timer pass
// that sized its work earlier is still running.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as os from 'os';
import { CacheEvictor } from '../src/cache-evictor';
import type { LayerRegistry } from '../src/layers';
import type { LayerCache } from '../src/layer-cache';

const MiB = 1 << 20;

/** A cache of 2 MiB frames whose evictions finish only when the test says so. */
function fakeCache(frames: number) {
  const cached = new Set<number>();
  const gates: Array<() => void> = [];
  let hand = 0;
  const c = {
    id: 'L',
    frameCount: frames,
    header: { frames: Array.from({ length: frames }, () => ({ uSize: 2 * MiB })) },
    get cachedBytes() { return cached.size * 2 * MiB; },
    clockStep(): number {
      for (let k = 0; k < frames; k++) { const i = hand; hand = (hand + 1) % frames; if (cached.has(i)) return i; }
      return -1;
    },
    async evict(list: number[]): Promise<number> {
      await new Promise<void>((r) => gates.push(r));
      let freed = 0;
      for (const i of list) if (cached.delete(i)) freed += 2 * MiB;
      return freed;
    },
  };
  return { c, cached, release: () => { for (const g of gates.splice(0)) g(); }, pending: () => gates.length };
}

test('evictNow after fetches that landed during a running pass: the limit holds', async () => {
  const f = fakeCache(16);
  const registry = { allCaches: () => [f.c as unknown as LayerCache] } as unknown as LayerRegistry;
  const ev = new CacheEvictor(registry, os.tmpdir(), { maxBytes: 4 * MiB }, async () => () => {});
  for (const i of [0, 1, 2, 3]) f.cached.add(i);       // 8 MiB
  const timerPass = ev.run();                          // sizes its work for 8 MiB
  await new Promise((r) => setImmediate(r));
  assert.is(f.pending(), 1, 'the timer pass is evicting');
  for (const i of [8, 9, 10]) f.cached.add(i);          // fetches land meanwhile
  const now = ev.runFresh();
  f.release();
  await timerPass;
  for (let k = 0; k < 10 && f.pending() === 0; k++) await new Promise((r) => setImmediate(r));
  f.release();
  await now;
  assert.ok(f.c.cachedBytes <= 4 * MiB, `cache ${f.c.cachedBytes} within 4 MiB after evictNow`);
});

test.run();
