// Concurrency hazards that bit real engines (shared/reference/hazards.md):
// each test here fails on the naive implementation.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import { Engine, Codec } from '../src/index';
import { CountingStore, makeImage, tmpdir } from './helpers/util';
import { keys } from '../src/format';

const dir = tmpdir('hazards');
const BLOCKS = 2048; // 8 MiB: four 2 MiB frames
const img = makeImage(BLOCKS, 7);
fs.writeFileSync(`${dir}/img`, img);
const store = new CountingStore(`${dir}/store`);
let engine: Engine;
let base: string;

test.before(async () => {
  engine = await Engine.open({ store });
  base = (await engine.importImage(`${dir}/img`, { codec: Codec.Zstd })).id;
});
test.after(async () => { await engine.close(); fs.rmSync(dir, { recursive: true, force: true }); });

test('H1: a read never mixes bytes of concurrent writes to the same blocks', async () => {
  const dev = await engine.openDevice(base);
  const len = 64 * 1024, off = 100 * 4096 + 512; // unaligned: exercises RMW too
  const patterns = new Set<number>();
  const ops: Promise<unknown>[] = [];
  const reads: Promise<Buffer>[] = [];
  for (let i = 1; i <= 60; i++) {
    patterns.add(i);
    ops.push(dev.write(off, Buffer.alloc(len, i)));
    if (i % 2 === 0) reads.push(dev.read(off, len));
  }
  await Promise.all(ops);
  for (const r of await Promise.all(reads)) {
    const v = r[0];
    assert.ok(patterns.has(v), `read saw ${v}`);
    assert.ok(r.every((b) => b === v), 'a read mixed two writes');
  }
  // Reads are copies: a write after the read resolved does not change the buffer (H1's stable buffer).
  const before = await dev.read(off, len);
  await dev.write(off, Buffer.alloc(len, 99));
  assert.ok(before.every((b) => b === before[0]) && before[0] !== 99);
  await engine.closeDevice(dev);
});

test('H11: concurrent cold misses on one frame fetch it once; a multi-frame read waits for every frame', async () => {
  const cold = await Engine.open({ store });
  try {
    const a = await cold.openDevice(base), b = await cold.openDevice(base);
    store.gets = 0;
    store.delayMs = 20; // make the fetch window wide so the misses really overlap
    const reads: Promise<Buffer>[] = [];
    for (let i = 0; i < 32; i++) reads.push((i % 2 ? a : b).read((i * 7 % 400) * 4096, 4096)); // all in frame 0
    const all = await Promise.all(reads);
    store.delayMs = 0;
    assert.is(store.gets, 1, `frame 0 fetched ${store.gets} times`);
    all.forEach((r, i) => assert.ok(r.equals(img.subarray((i * 7 % 400) * 4096, (i * 7 % 400) * 4096 + 4096))));
    // A read spanning three frames returns correct bytes for all of them.
    const span = await a.read(500 * 4096, 1100 * 4096);
    assert.ok(span.equals(img.subarray(500 * 4096, 1600 * 4096)));
  } finally { await cold.close(); }
});

/** A device offset whose block is stored in frame `fi` of the base layer. */
async function offsetInFrame(e: Engine, fi: number): Promise<number> {
  const h = await e.inspect(base);
  const f = h.frames[fi];
  const ext = h.extents.find((x) => x.layer === 0 && x.data < f.u + f.uSize && f.u < x.data + x.len)!;
  return ext.dev + Math.max(0, f.u - ext.data);
}

test('H12: a corrupt frame is neither served nor cached; a failed fetch is retried later', async () => {
  const cold = await Engine.open({ store });
  try {
    const dev = await cold.openDevice(base);
    const off = await offsetInFrame(cold, 0);
    store.corruptNext = 1;
    let err: { code?: string } | undefined;
    try { await dev.read(off, 4096); } catch (e) { err = e as { code?: string }; }
    assert.is(err?.code, 'EBADMSG', 'corrupt frame must fail the read');
    // Not cached: the next read fetches again and gets good data.
    const gets = store.gets;
    assert.ok((await dev.read(off, 4096)).equals(img.subarray(off, off + 4096)));
    assert.is(store.gets, gets + 1);
    // A store failure is an error, then a retry succeeds.
    const off2 = await offsetInFrame(cold, 1);
    store.failNext = 1;
    err = undefined;
    try { await dev.read(off2, 4096); } catch (e) { err = e as { code?: string }; }
    assert.is(err?.code, 'EIO');
    assert.ok((await dev.read(off2, 4096)).equals(img.subarray(off2, off2 + 4096)));
  } finally { await cold.close(); }
});

test('H12: bytes corrupted at rest in the object store are caught by the frame checksum', async () => {
  const cold = await Engine.open({ store });
  const dataFile = `${dir}/store/${keys.data(base)}`;
  const orig = fs.readFileSync(dataFile);
  try {
    const h = await cold.inspect(base);
    const f = h.frames[1];
    const bad = Buffer.from(orig);
    bad[f.c + Math.floor(f.cSize / 2)] ^= 0x5a;
    fs.writeFileSync(dataFile, bad);
    const dev = await cold.openDevice(base);
    let code = '';
    try { await dev.read(await offsetInFrame(cold, 1), 4096); code = 'served'; } catch (e) { code = (e as { code: string }).code; }
    assert.is(code, 'EBADMSG');
  } finally {
    fs.writeFileSync(dataFile, orig);
    await cold.close();
  }
});

test('H14: snapshot during writes is point-in-time; reads during the upload and after the rebase are right', async () => {
  const dev = await engine.openDevice(base);
  const model = Buffer.from(img);
  for (let i = 0; i < 50; i++) {
    const off = ((i * 37) % (BLOCKS - 8)) * 4096;
    const d = Buffer.alloc(8192, i + 1);
    await dev.write(off, d);
    d.copy(model, off);
  }
  const expected = Buffer.from(model);
  store.delayMs = 0;
  const snap = dev.snapshot();
  const during: Promise<unknown>[] = [];
  for (let i = 0; i < 50; i++) {
    const off = ((i * 53) % (BLOCKS - 4)) * 4096;
    const d = Buffer.alloc(4096 * 3, 200 + (i % 50));
    during.push(dev.write(off, d));
    d.copy(model, off);
    const roff = ((i * 11) % (BLOCKS - 2)) * 4096;
    during.push(dev.read(roff, 8192).then((r) => r)); // just exercising reads through the frozen overlay
  }
  const s = await snap;
  await Promise.all(during);
  assert.ok((await dev.read(0, BLOCKS * 4096)).equals(model), 'device holds every write');
  const resumed = await engine.openDevice(s.id);
  assert.ok((await resumed.read(0, BLOCKS * 4096)).equals(expected), 'snapshot holds exactly the pre-call state');
  await engine.closeDevice(resumed);
  await engine.closeDevice(dev);
});

test('H14: a failed snapshot upload loses nothing (changes fold back into the device)', async () => {
  const dev = await engine.openDevice(base);
  const data = Buffer.alloc(3 * 4096, 0x77);
  await dev.write(4096 * 10, data);
  const origPut = store.put.bind(store);
  store.put = async (key, body) => {
    if (key.endsWith('/data')) {
      // Consume the stream partially, then fail like a dropped connection.
      if (!(body instanceof Uint8Array)) for await (const _ of body) break;
      throw new Error('injected upload failure');
    }
    return origPut(key, body);
  };
  let err: Error | undefined;
  const s1 = dev.snapshot();
  const w = dev.write(4096 * 11, Buffer.alloc(4096, 0x88)); // a newer write over part of it
  try { await s1; } catch (e) { err = e as Error; }
  await w;
  store.put = origPut;
  assert.ok(err, 'the snapshot must fail');
  const got = await dev.read(4096 * 10, 3 * 4096);
  const want = Buffer.from(data); want.fill(0x88, 4096, 8192);
  assert.ok(got.equals(want), 'frozen changes came back, the newer write won');
  const layers = await engine.listLayers();
  assert.ok(layers.every((id) => id === base || fs.existsSync(`${dir}/store/layers/${id}/header`)));
  // And a later snapshot carries everything.
  const s2 = await dev.snapshot();
  const r = await engine.openDevice(s2.id);
  assert.ok((await r.read(4096 * 10, 3 * 4096)).equals(want));
  await engine.closeDevice(r);
  await engine.closeDevice(dev);
});

test('H15: concurrent sub-block writes to one block are serialized (no lost update)', async () => {
  const dev = await engine.openDevice(base);
  const block = 300;
  const ops: Promise<void>[] = [];
  for (let s = 0; s < 8; s++) ops.push(dev.write(block * 4096 + s * 512, Buffer.alloc(512, 0x10 + s)));
  // Interleave reads of neighbouring data while they run.
  ops.push(dev.read(block * 4096 - 4096, 3 * 4096).then(() => undefined));
  await Promise.all(ops);
  const got = await dev.read(block * 4096, 4096);
  for (let s = 0; s < 8; s++) assert.ok(got.subarray(s * 512, s * 512 + 512).every((b) => b === 0x10 + s), `sector ${s} lost`);
  // Sub-block writes spanning a block boundary, racing each other.
  const a = dev.write(block * 4096 + 3584, Buffer.alloc(1024, 0xaa));
  const b = dev.write(block * 4096 + 4096 + 512, Buffer.alloc(512, 0xbb));
  await Promise.all([a, b]);
  const g2 = await dev.read(block * 4096 + 3584, 2048);
  assert.ok(g2.subarray(0, 1024).every((x) => x === 0xaa) && g2.subarray(1024, 1536).every((x) => x === 0xbb));
  await engine.closeDevice(dev);
});

test('requests that hold all request buffers while waiting on fetches cannot deadlock the fetches', async () => {
  const small = await Engine.open({ store, arenaBytes: 16 << 20 });
  try {
    const dev = await small.openDevice(base);
    store.delayMs = 5;
    const reads: Promise<Buffer>[] = [];
    // 48 × 1 MiB in flight against 8 MiB of request buffers, every frame cold.
    for (let i = 0; i < 48; i++) reads.push(dev.read(((i * 256) % (BLOCKS - 256)) * 4096, 1 << 20));
    let timer: NodeJS.Timeout | undefined;
    const all = await Promise.race([Promise.all(reads), new Promise<null>((r) => { timer = setTimeout(() => r(null), 30_000); })]);
    clearTimeout(timer);
    store.delayMs = 0;
    assert.ok(all, 'reads did not finish within 30 s (deadlock)');
    all!.forEach((b, i) => { const o = ((i * 256) % (BLOCKS - 256)) * 4096; assert.ok(b.equals(img.subarray(o, o + (1 << 20)))); });
  } finally { store.delayMs = 0; await small.close(); }
});

test.run();
