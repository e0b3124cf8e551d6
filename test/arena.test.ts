// The I/O arena (src/arena.ts): every live buffer is disjoint from every
// other, and releasing everything gives all of the arena back.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { IoArena } from '../src/arena';

const K = 1024, M = 1024 * 1024;

function live(): { add(p: number, n: number): void; drop(p: number): void } {
  const m = new Map<number, number>();
  return {
    add(p, n) {
      for (const [q, l] of m) assert.ok(p + n <= q || q + l <= p, `buffer ${p}+${n} overlaps live buffer ${q}+${l}`);
      m.set(p, n);
    },
    drop(p) { m.delete(p); },
  };
}

test('a block reused at another size is not handed out again at its old size', async () => {
  const a = new IoArena(0, 2 * M);
  const l = live();
  const p0 = await a.acquire(M); l.add(p0, M);
  const q = await a.acquire(M); l.add(q, M);
  a.release(p0); l.drop(p0);             // kept on the 1 MiB stack
  const small = await a.acquire(12 * K);  // arena full: the stack is dropped, p0 reused at 12 KiB
  l.add(small, 12 * K);
  const x = await a.acquire(4 * K); l.add(x, 4 * K);
  a.release(small); l.drop(small);
  const big = a.acquire(M);              // must not be p0 again while x lives inside it
  const got = await Promise.race([big, new Promise<number>((r) => setTimeout(() => r(-1), 50))]);
  if (got >= 0) l.add(got, M);
  a.release(x); l.drop(x);
  if (got < 0) l.add(await big, M);
});

test('random acquire/release: buffers never overlap, nothing leaks', async () => {
  let seed = 1;
  const rnd = (n: number) => { seed = (seed * 1103515245 + 12345) >>> 0; return seed % n; };
  const sizes = [4 * K, 12 * K, 64 * K, 200 * K, M, 3 * M / 2];
  const a = new IoArena(4096, 2 * M);
  const l = live();
  const held: Array<[number, number]> = [];
  for (let i = 0; i < 5000; i++) {
    if (held.length && (rnd(2) === 0 || held.length > 6)) {
      const [p] = held.splice(rnd(held.length), 1)[0];
      a.release(p); l.drop(p);
    } else {
      const n = sizes[rnd(sizes.length)];
      const pending = a.acquire(n);
      // Waits only while held buffers fill the arena: free some until it arrives.
      let p = -1;
      void pending.then((v) => { p = v; });
      while (p < 0) {
        await new Promise((r) => setImmediate(r));
        if (p < 0 && held.length) { const [h] = held.splice(0, 1)[0]; a.release(h); l.drop(h); }
        else if (p < 0) { await new Promise((r) => setTimeout(r, 5)); assert.ok(p >= 0, `acquire(${n}) never completes with nothing held`); }
      }
      l.add(p, n); held.push([p, n]);
    }
  }
  for (const [p] of held.splice(0)) { a.release(p); l.drop(p); }
  assert.is(a.used, 0, 'every byte back');
  const all = await Promise.race([a.acquire(2 * M), new Promise<number>((r) => setTimeout(() => r(-1), 50))]);
  assert.ok(all >= 0, 'the whole arena can be taken again');
});

test.run();
