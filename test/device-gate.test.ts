// The data plane (the I/O workers) and its gate with the engine
// (assembly/gate.ts, src/device-gate.ts), driven over NBD: what the workers
// serve, what they hand to the engine, and that snapshots taken while they
// write lose nothing.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import { RawClient } from './helpers/nbd-client';
import { nbdFixture, Fixture } from './helpers/nbd-fixture';
import { Engine } from '../src/index';
import { NbdServer } from '../src/nbd/server';
import { ExportMap } from '../src/nbd/export';
import { deviceExport } from '../src/nbd-export';
import { tmpdir } from './helpers/util';
import { openStore } from '../src/store/open';
import type { ObjectStore } from '../src/store/types';
import { SharedHeap, layout, S } from '../src/wasm';
import { DeviceGate } from '../src/device-gate';

const BS = 4096;
let f: Fixture;
test.before(async () => { f = await nbdFixture('nplane'); });

/** The fixture's base layer as a new device of `eng`, exported as `name` on a socket in `dir`. */
async function serveFresh(eng: Engine, name: string, dir: string) {
  const d = await eng.openDevice(f.base);
  const exports = new ExportMap();
  exports.set(name, deviceExport(d));
  const srv = new NbdServer({ exports });
  return { d, srv, sock: await srv.listenUnix(`${dir}/nbd.sock`) };
}
test.after(async () => { await f.close(); });

// The gate itself (assembly/gate.ts), as an I/O worker meets it: writeStart
// plans by the write rule from a VIEW record made here (overlay file 7,
// every block DIRTY), so no engine is needed.
function gateBench() {
  const heap = new SharedHeap({ reserveBytes: 0 });
  const l = layout(), w = heap.wasm;
  const blocks = 64;
  const table = heap.alloc(blocks), view = heap.alloc(l.VIEW_SIZE);
  w.stateFill(table, 0, blocks, S.DIRTY);
  const v = new DataView(heap.buffer);
  v.setInt32(view + l.VIEW_CUR_FD, 7, true);
  v.setUint32(view + l.VIEW_CUR_TABLE, table, true);
  const gate = new DeviceGate(heap, blocks * BS, BS);
  const start = (off: number, final = 0) => w.writeStart(gate.ptr, off, BS, final, BS);
  const end = (off: number, ok = 1) => w.writeEnd(gate.ptr, off, BS, ok, 30_000, BS);
  return { heap, w, l, gate, view, start, end };
}

test('the gate: no view, no worker request; the engine inside keeps workers out and waits for theirs', async () => {
  const { w, l, gate, view, start, end } = gateBench();
  assert.is(start(0), l.GATE_SLOW, 'nothing published yet');
  assert.is(gate.stats().slowGate, 1);
  await gate.gated(true, () => gate.publish(view));
  assert.is(start(0), 7, 'the overlay file of the view');
  // An engine writer now waits for that write, and none starts meanwhile.
  let inside = false;
  const engine = gate.gated(true, () => { inside = true; });
  await new Promise((r) => setImmediate(r));
  assert.not.ok(inside, 'the engine waits for the worker write in flight');
  assert.is(start(8 * BS), l.GATE_SLOW, 'no worker request starts while the engine waits');
  end(0);
  await engine;
  assert.ok(inside);
  const held = await gate.hold();
  assert.ok(w.gateSetView(gate.ptr, view), 'held as a writer, drained: the view may change');
  held();
  assert.not.ok(w.gateSetView(gate.ptr, view), 'the view changes only with the gate held');
  const s = gate.stats();
  assert.is(s.fastWrites, 1);
  assert.is(s.writeBytes, BS);
  assert.is(s.latency!.write.counts[2], 1, '30 µs lands in the (25, 50] µs bucket');
  assert.is(s.latency!.boundsNs[1], 25_000);
});

test('the gate: a write holds its 4 KiB stripes until it ends; the engine takes stripes of its blocks only', async () => {
  const { w, l, gate, view, start, end } = gateBench();
  await gate.gated(true, () => gate.publish(view));
  assert.is(start(4 * BS), 7);
  assert.is(start(4 * BS), l.GATE_BUSY, 'the same stripe: busy, nothing held');
  assert.is(w.readStart(gate.ptr, 4 * BS + 512, 512, 0, BS, 0, 0), l.GATE_BUSY, 'a read of it too');
  assert.is(start(4 * BS, 1), l.GATE_SLOW, 'when final: the engine\'s');

  assert.is(gate.stats().slowBusy, 1);
  assert.is(start(5 * BS), 7, 'the next stripe is free');
  end(5 * BS);
  assert.not.ok(gate.lockRange(4 * BS, BS, false), 'the engine cannot take a stripe a worker write holds');
  end(4 * BS);
  assert.ok(gate.lockRange(4 * BS + 100, 10, true), 'widened to the block');
  assert.is(start(4 * BS), l.GATE_BUSY);
  assert.is(start(6 * BS), 7, 'other blocks stay the workers\'');
  end(6 * BS, 0);
  gate.unlockRange(4 * BS + 100, 10);
  assert.is(start(4 * BS), 7);
  end(4 * BS);
  assert.ok(gate.lockRange(0, 64 * BS, true), 'every stripe was released');
  gate.unlockRange(0, 64 * BS);
  assert.is(gate.stats().fastWrites, 3, 'a failed write is not counted');
  // An engine reader (it enters once no worker write is in flight) keeps
  // worker writes out, not reads.
  await gate.gated(false, () => {
    assert.is(start(9 * BS), l.GATE_SLOW);
    assert.is(gate.stats().slowGate, 1);
    // A read passes it (to the planner, which has no room for a segment here).
    const plans = gate.stats().slowPlans;
    assert.is(w.readStart(gate.ptr, 9 * BS, BS, 1, BS, 0, 0), l.GATE_SLOW);
    assert.equal([gate.stats().slowGate, gate.stats().slowPlans], [1, plans + 1]);
  });
});

test('a closed device\'s gate record lives while a connection holds it, then is freed', async () => {
  const d = await f.addDevice('g');
  const c = await RawClient.open(f.sock, 'g');
  assert.is((await c.read(0, BS)).error, 0);
  const heap = (d as unknown as { core: { heap: SharedHeap } }).core.heap;
  const ptr = d.gate().ptr;
  await d.close();
  assert.is(heap.wasm.gateRefs(ptr), 1, 'the connection\'s hold');
  assert.ok(heap.heap.sizeOf(ptr) !== undefined, 'not freed under the connection');
  c.close();
  for (let i = 0; i < 100 && heap.heap.sizeOf(ptr) !== undefined; i++) await new Promise((r) => setTimeout(r, 50));
  assert.is(heap.heap.sizeOf(ptr), undefined, 'freed once the connection closed');
});

test('aligned reads of cached data and writes are served natively; the data is right', async () => {
  const d = await f.addDevice('a');
  const c = await RawClient.open(f.sock, 'a');
  // The first read may fetch (an imported layer's cache starts cold); the
  // second is served from the cache file.
  for (let i = 0; i < 2; i++) {
    const r = await c.read(10 * BS, 8 * BS);
    assert.is(r.error, 0);
    assert.ok(r.data.equals(f.img.subarray(10 * BS, 18 * BS)));
  }
  assert.is((await c.write(20 * BS, Buffer.alloc(4 * BS, 0xab))).error, 0);
  const back = await c.read(18 * BS, 8 * BS);
  assert.ok(back.data.subarray(0, 2 * BS).equals(f.img.subarray(18 * BS, 20 * BS)));
  assert.ok(back.data.subarray(2 * BS, 6 * BS).every((x) => x === 0xab));
  assert.ok(back.data.subarray(6 * BS).equals(f.img.subarray(24 * BS, 26 * BS)));
  const s = d.nativeStats();
  assert.ok(s.fastReads >= 2 && s.fastWrites === 1, JSON.stringify(s));
  // Every native request lands in its op's service-time histogram.
  const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
  assert.is(sum(s.latency!.read.counts), s.fastReads);
  assert.is(sum(s.latency!.write.counts), s.fastWrites);
  assert.ok(s.latency!.write.sumNs > 0 && s.latency!.read.sumNs > 0);
  assert.is(s.latency!.boundsNs.length + 1, s.latency!.read.counts.length);
  // The engine sees what the natives wrote.
  assert.ok((await d.read(20 * BS, 4 * BS)).every((x) => x === 0xab));
  c.close();
});

test('a sub-block write over data the overlay lacks goes to the engine (copy-on-write), then is native', async () => {
  const d = await f.addDevice('b');
  const c = await RawClient.open(f.sock, 'b');
  const before = d.nativeStats();
  assert.is((await c.write(30 * BS + 512, Buffer.alloc(1024, 0x5a))).error, 0);
  const mid = d.nativeStats();
  assert.is(mid.fastWrites, before.fastWrites, 'the copy-on-write was not native');
  assert.is((await c.write(30 * BS + 2048, Buffer.alloc(512, 0x6b))).error, 0);
  assert.is(d.nativeStats().fastWrites, mid.fastWrites + 1, 'a sub-block write over a DIRTY block is native');
  const got = (await c.read(30 * BS, BS)).data;
  const want = Buffer.from(f.img.subarray(30 * BS, 31 * BS));
  want.fill(0x5a, 512, 1536);
  want.fill(0x6b, 2048, 2560);
  assert.ok(got.equals(want));
  c.close();
});

test('engine requests exclude natives from their own blocks only (stripes), never the whole device', async () => {
  const d = await f.addDevice('s');
  const c = await RawClient.open(f.sock, 's');
  await c.read(40 * BS, BS); // warm
  await c.read(90 * BS, BS);
  const t = d.gate();
  // Hold block 40 the way an engine write does.
  assert.ok(t.lockRange(40 * BS, BS, true));
  assert.not.ok(t.lockRange(40 * BS + 512, 512, false), 'a held stripe is not taken twice');
  const s0 = d.nativeStats();
  const far = await c.read(90 * BS, BS);
  assert.ok(far.data.equals(f.img.subarray(90 * BS, 91 * BS)));
  const s1 = d.nativeStats();
  assert.is(s1.fastReads, s0.fastReads + 1, 'a read elsewhere stays native');
  // A read of the held block goes to the engine; the engine, unable to take
  // the stripe, falls back to the whole gate and still answers.
  const near = await c.read(40 * BS, BS);
  assert.ok(near.data.equals(f.img.subarray(40 * BS, 41 * BS)));
  const s2 = d.nativeStats();
  assert.is(s2.fastReads, s1.fastReads);
  assert.is(s2.slowBusy, (s1.slowBusy ?? 0) + 1);
  t.unlockRange(40 * BS, BS);
  assert.ok(t.lockRange(0, 64 * BS, true), 'every stripe was released');
  t.unlockRange(0, 64 * BS);
  c.close();
});

test('natives keep serving other blocks while an engine write waits on the object store', async () => {
  // An engine whose store holds every GET until released: a copy-on-write
  // over a cold frame then stays inside the engine as long as we like.
  const dir = tmpdir('nplane-stall');
  const fsStore = openStore(`${f.dir}/store`);
  let stall: Promise<void> | null = null, release = () => {}, entered = () => {};
  const inGet = new Promise<void>((r) => { entered = r; });
  const store: ObjectStore = {
    get: async (key, range) => { if (stall && key.includes('data')) { entered(); await stall; } return fsStore.get(key, range); },
    put: (k, d) => fsStore.put(k, d), head: (k) => fsStore.head(k), list: (p) => fsStore.list(p), delete: (k) => fsStore.delete(k),
  };
  const eng = await Engine.open({ store, cacheDir: `${dir}/cache` });
  try {
    const { d, srv, sock } = await serveFresh(eng, 'x', dir);
    const a = await RawClient.open(sock, 'x'), b = await RawClient.open(sock, 'x');
    await b.read(100 * BS, BS); // fetched: its frame is cached now
    stall = new Promise<void>((r) => { release = r; });
    const w = a.write(3000 * BS + 512, Buffer.alloc(512, 0x77)); // cold frame: the engine fetches
    await inGet;
    const before = d.nativeStats();
    // Before stripes, the engine write closed the whole gate: this read went
    // to the engine and waited behind the stalled write.
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<never>((_, rej) => { timer = setTimeout(() => rej(new Error('the read waited for an unrelated engine write')), 5000); });
    const r = await Promise.race([b.read(100 * BS, BS), late]).finally(() => clearTimeout(timer));
    const after = d.nativeStats();
    assert.ok(r.data.equals(f.img.subarray(100 * BS, 101 * BS)));
    assert.is(after.fastReads, before.fastReads + 1, 'served natively while the engine write is in flight');
    assert.is(after.slowGate, before.slowGate);
    release();
    assert.is((await w).error, 0);
    const back = (await b.read(3000 * BS, BS)).data;
    const want = Buffer.from(f.img.subarray(3000 * BS, 3001 * BS));
    want.fill(0x77, 512, 1024);
    assert.ok(back.equals(want));
    a.close(); b.close();
    await srv.close();
  } finally {
    release();
    await eng.close();
  }
});

test('cold frames go the slow path (fetched once), then are served natively', async () => {
  // A second engine on the same store with its own, empty cache.
  const dir = tmpdir('nplane-cold');
  const eng = await Engine.open({ store: `${f.dir}/store`, cacheDir: `${dir}/cache` });
  try {
    const { d, srv, sock } = await serveFresh(eng, 'cold', dir);
    const c = await RawClient.open(sock, 'cold');
    // Far from what other tests read: not in the layer's boot profile, so
    // nothing prefetches it while the I/O workers of this engine start.
    const AT = 3000 * BS;
    const r1 = await c.read(AT, 16 * BS);
    assert.ok(r1.data.equals(f.img.subarray(AT, AT + 16 * BS)));
    const s1 = d.nativeStats();
    assert.ok(s1.slowPlans >= 1 && s1.fastReads === 0, JSON.stringify(s1));
    const r2 = await c.read(AT, 16 * BS);
    assert.ok(r2.data.equals(r1.data));
    assert.is(d.nativeStats().fastReads, 1);
    c.close();
    await srv.close();
  } finally {
    await eng.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('snapshots taken while natives write lose nothing: every acknowledged write is in the device, the snapshot or the next', async () => {
  const d = await f.addDevice('s');
  const c = await RawClient.open(f.sock, 's');
  const N = 600;
  const tag = (i: number) => Buffer.alloc(BS, (i % 250) + 1);
  const acked: Promise<unknown>[] = [];
  let snap: Promise<{ id: string }> | undefined;
  for (let i = 0; i < N; i++) {
    acked.push(c.write(((i * 7) % 3000) * BS, tag(i)).then((r) => assert.is(r.error, 0)));
    if (i === N / 2) snap = d.snapshot();
    if (i % 50 === 0) await new Promise((r) => setImmediate(r));
  }
  await Promise.all(acked);
  const first = await snap!;
  const second = await d.snapshot();
  // Last write per block wins (writes to one block are issued in order on
  // one connection, but may complete in any order: only check blocks
  // written once).
  const count = new Map<number, number>();
  for (let i = 0; i < N; i++) count.set((i * 7) % 3000, (count.get((i * 7) % 3000) ?? 0) + 1);
  const fresh = await f.engine.openDevice(second.id);
  for (let i = 0; i < N; i++) {
    const b = (i * 7) % 3000;
    if (count.get(b) !== 1) continue;
    const live = (await c.read(b * BS, BS)).data;
    assert.ok(live.equals(tag(i)), `block ${b} on the device`);
    assert.ok((await fresh.read(b * BS, BS)).equals(tag(i)), `block ${b} in the second snapshot`);
  }
  // The first snapshot holds exactly the writes acknowledged before it froze
  // or the image: never a torn block.
  const firstDev = await f.engine.openDevice(first.id);
  for (const b of count.keys()) {
    const got = await firstDev.read(b * BS, BS);
    assert.ok(got.equals(f.img.subarray(b * BS, (b + 1) * BS)) || got.every((x) => x === got[0] && x !== 0), `block ${b} torn in the first snapshot`);
  }
  assert.ok(d.nativeStats().fastWrites > 0);
  await fresh.close(); await firstDev.close();
  c.close();
});

test('a closed device answers natively-routed requests with errors, never with stale data', async () => {
  const d = await f.addDevice('x');
  const c = await RawClient.open(f.sock, 'x');
  assert.is((await c.read(0, BS)).error, 0);
  await d.close();
  const r = await c.read(0, BS);
  assert.ok(r.error !== 0, 'read after close fails');
  const w = await c.write(0, Buffer.alloc(BS, 1));
  assert.ok(w.error !== 0, 'write after close fails');
  c.close();
});

test.run();
