// Device API contract and bad input: typed errors with errno, nothing served
// from corrupt objects, nothing overwritten.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import { Engine, Codec, StrataError } from '../src/index';
import { keys, MAX_HEADER } from '../src/format';
import { makeImage, tmpdir } from './helpers/util';

const dir = tmpdir('engine');
const BLOCKS = 1024;
const img = makeImage(BLOCKS, 3);
fs.writeFileSync(`${dir}/img`, img);
let engine: Engine;
let base: string;

test.before(async () => {
  engine = await Engine.open({ store: `${dir}/store` });
  base = (await engine.importImage(`${dir}/img`, { codec: Codec.Lz4 })).id;
});
test.after(async () => { await engine.close(); fs.rmSync(dir, { recursive: true, force: true }); });

async function errOf(p: Promise<unknown> | (() => unknown)): Promise<StrataError | undefined> {
  try { await (typeof p === 'function' ? p() : p); } catch (e) { return e as StrataError; }
  return undefined;
}

test('misaligned and out-of-range requests fail with typed errors carrying errno', async () => {
  const dev = await engine.openDevice(base);
  const size = BLOCKS * 4096;
  const cases: Array<[Promise<unknown> | (() => unknown), string]> = [
    [() => dev.read(100, 512), 'EINVAL'],
    [() => dev.read(0, 1000), 'EINVAL'],
    [() => dev.read(size - 512, 1024), 'EINVAL'],
    [() => dev.write(size, Buffer.alloc(512)), 'ENOSPC'],
    [() => dev.write(-512, Buffer.alloc(512)), 'EINVAL'],
    [() => dev.writeZeroes(size - 4096, 8192), 'ENOSPC'],
    [() => dev.trim(3, 512), 'EINVAL'],
  ];
  for (const [f, code] of cases) {
    const e = await errOf(f);
    assert.instance(e, StrataError);
    assert.is(e!.code, code);
    assert.is(e!.errno, (require('os').constants.errno as Record<string, number>)[code]);
  }
  assert.is((await dev.read(0, 0)).length, 0);
  await engine.closeDevice(dev);
  assert.is((await errOf(() => dev.read(0, 512)))?.code, 'ESHUTDOWN');
});

test('512-byte granularity: sector writes and reads at any sector', async () => {
  const dev = await engine.openDevice(base);
  const model = Buffer.from(img);
  for (const off of [512, 4096 - 512, 4096 * 5 + 1536, BLOCKS * 4096 - 512]) {
    const d = Buffer.alloc(512, off % 251);
    await dev.write(off, d);
    d.copy(model, off);
  }
  assert.ok((await dev.read(0, BLOCKS * 4096)).equals(model));
  await engine.closeDevice(dev);
});

test('zeroMap reports zero extents and trimmed ranges truthfully', async () => {
  const dev = await engine.openDevice(base);
  const h = await engine.inspect(base);
  const size = BLOCKS * 4096;
  await dev.writeZeroes(8192, 3 * 4096);
  await dev.write(0, Buffer.alloc(4096, 1));
  const map = dev.zeroMap(0, size);
  assert.is(map.reduce((a, e) => a + e.length, 0), size);
  for (let b = 0; b < BLOCKS; b++) {
    const ent = map.find((e) => e.offset <= b * 4096 && b * 4096 < e.offset + e.length)!;
    const ext = h.extents.find((e) => e.dev <= b * 4096 && b * 4096 < e.dev + e.len)!;
    const expectZero = b === 0 ? false : (b >= 2 && b < 5) ? true : ext.layer === 0xffffffff;
    assert.is(ent.zero, expectZero, `block ${b}`);
  }
  // Zero-reported ranges really read as zeros.
  for (const e of map.filter((x) => x.zero)) assert.ok((await dev.read(e.offset, e.length)).every((x) => x === 0));
  const part = dev.zeroMap(8192 + 512, 1024);
  assert.equal(part, [{ offset: 8192 + 512, length: 1024, zero: true }]);
  await engine.closeDevice(dev);
});

test('zero blocks cost no fetch; dedup stores repeated blocks once', async () => {
  const h = await engine.inspect(base);
  const zeroBlocks = h.extents.filter((e) => e.layer === 0xffffffff).reduce((a, e) => a + e.len, 0) / 4096;
  const distinct = new Set<string>();
  let nonZero = 0;
  for (let b = 0; b < BLOCKS; b++) {
    const blk = img.subarray(b * 4096, b * 4096 + 4096);
    if (blk.every((x) => x === 0)) continue;
    nonZero++;
    distinct.add(blk.toString('base64'));
  }
  assert.is(zeroBlocks, BLOCKS - nonZero);
  assert.is(h.dataSize / 4096, distinct.size, 'each distinct block stored once');
  assert.ok(distinct.size < nonZero, 'the image has duplicates to dedup');
  // A snapshot that rewrites blocks with content the parent already stores stores nothing new.
  const dev = await engine.openDevice(base);
  let b0 = 0;
  while (img.subarray(b0 * 4096, b0 * 4096 + 4096).every((x) => x === 0)) b0++;
  await dev.write(900 * 4096, img.subarray(b0 * 4096, b0 * 4096 + 4096));
  const s = await dev.snapshot();
  assert.is(s.stats.storedBlocks, 0);
  assert.is(s.stats.dedupBlocks, 1);
  await engine.closeDevice(dev);
});

test('bad layer objects: wrong magic, truncated, corrupted, oversized, missing → clear errors, nothing served', async () => {
  const hdr = `${dir}/store/${keys.header(base)}`;
  const orig = fs.readFileSync(hdr);
  const attempt = async (bytes: Buffer | null) => {
    const e2 = await Engine.open({ store: `${dir}/store` });
    try {
      if (bytes) fs.writeFileSync(hdr, bytes); else fs.rmSync(hdr);
      return await errOf(e2.openDevice(base));
    } finally { fs.writeFileSync(hdr, orig); await e2.close(); }
  };
  const magic = Buffer.from(orig); magic.write('NOTSTRAT', 0);
  assert.is((await attempt(magic))?.code, 'EBADMSG');
  assert.match((await attempt(magic))!.message, /wrong magic/);
  assert.is((await attempt(orig.subarray(0, orig.length - 1)))?.code, 'EBADMSG');
  const flip = Buffer.from(orig); flip[90] ^= 1;
  assert.is((await attempt(flip))?.code, 'EBADMSG');
  const huge = Buffer.alloc(MAX_HEADER + 4096); orig.copy(huge);
  assert.match((await attempt(huge))!.message, /over the/);
  assert.is((await attempt(null))?.code, 'ENOENT');
  assert.is((await errOf(engine.openDevice('../../etc')))?.code, 'EINVAL');
  // The original is untouched and still works.
  const dev = await engine.openDevice(base);
  assert.ok((await dev.read(0, 4096 * 8)).equals(img.subarray(0, 4096 * 8)));
  await engine.closeDevice(dev);
});

test('a truncated data object fails reads of the missing frames with EBADMSG', async () => {
  const dataFile = `${dir}/store/${keys.data(base)}`;
  const orig = fs.readFileSync(dataFile);
  const e2 = await Engine.open({ store: `${dir}/store` });
  try {
    fs.writeFileSync(dataFile, orig.subarray(0, 10));
    const dev = await e2.openDevice(base);
    const h = await e2.inspect(base);
    const ext = h.extents.find((x) => x.layer === 0)!;
    assert.is((await errOf(dev.read(ext.dev, 4096)))?.code, 'EBADMSG');
  } finally { fs.writeFileSync(dataFile, orig); await e2.close(); }
});

test('import rejects images that are not whole blocks, and missing files', async () => {
  fs.writeFileSync(`${dir}/odd`, Buffer.alloc(4096 + 512));
  assert.is((await errOf(engine.importImage(`${dir}/odd`)))?.code, 'EINVAL');
  assert.is((await errOf(engine.importImage(`${dir}/nope`)))?.code, 'ENOENT');
});

test('a whole-device prefetch (NBD CACHE) stays bounded in memory and warms every frame', async () => {
  const rnd = require('crypto').randomBytes(48 << 20) as Buffer; // incompressible: 24 frames of ~2 MiB
  fs.writeFileSync(`${dir}/rnd`, rnd);
  const id = (await engine.importImage(`${dir}/rnd`, { codec: Codec.Zstd })).id;
  const e2 = await Engine.open({ store: `${dir}/store`, fetchConcurrency: 4 });
  try {
    const dev = await e2.openDevice(id);
    const before = e2.core.heap.memory.buffer.byteLength;
    await dev.prefetch(0, dev.size);
    const grown = (e2.core.heap.memory.buffer.byteLength - before) / (1 << 20);
    // Bounded by the fetches in flight (4 here, ~2 MiB of compressed input each), not by the 48 MiB asked for.
    assert.ok(grown <= 16, `shared heap grew by ${grown} MiB`);
    assert.is(e2.stats().cache.fetches, 24);
    assert.ok((await dev.read(40 << 20, 1 << 20)).equals(rnd.subarray(40 << 20, 41 << 20)));
    assert.is(e2.stats().cache.fetches, 24, 'reads after the prefetch fetch nothing');
  } finally { await e2.close(); }
});

/**
 * Fault injection at the engine's ring: the next fsync fails as a lost
 * writeback would and later ones succeed, as the kernel's once-per-file
 * errseq report does. Returns the undo.
 */
function failNextFsync(e: Engine): () => void {
  const uring = (e as unknown as { core: { uring: { fsync: (fd: number) => Promise<number> } } }).core.uring;
  const real = uring.fsync;
  let failed = false;
  uring.fsync = (fd: number) => {
    if (failed) return real.call(uring, fd);
    failed = true;
    return Promise.reject(new StrataError('EIO', 'fsync: EIO'));
  };
  return () => { uring.fsync = real; };
}

test('a failed overlay fsync sticks: later flushes, FUA writes and snapshots fail with EIO (errseq reports it once)', async () => {
  const dev = await engine.openDevice(base);
  try {
    await dev.write(0, Buffer.alloc(8192, 7));
    const restore = failNextFsync(engine);
    try {
      const first = await errOf(dev.flush());
      assert.is(first?.code, 'EIO');
      assert.match(first!.message, /acknowledged before it may be lost/);
      assert.is((await errOf(dev.flush()))?.code, 'EIO', 'the second flush fails too');
      assert.is((await errOf(dev.write(8192, Buffer.alloc(4096, 1), { fua: true })))?.code, 'EIO', 'a FUA write is not durable either');
      assert.is((await errOf(dev.snapshot()))?.code, 'EIO', 'no snapshot of data that may be lost');
      assert.equal(await dev.read(0, 8192), Buffer.alloc(8192, 7), 'reads still work');
    } finally { restore(); }
  } finally { await engine.closeDevice(dev); }
});

test('a durable device whose writeback failed is suspended with the failure in its manifest and not resumed', async () => {
  const cache = `${dir}/cache-wb`;
  const e = await Engine.open({ store: `${dir}/store`, cacheDir: cache });
  try {
    const dev = await e.openDevice(base, { id: 'wb', durable: true });
    await dev.write(0, Buffer.alloc(4096, 9));
    const restore = failNextFsync(e);
    assert.is((await errOf(dev.flush()))?.code, 'EIO');
    restore();
    assert.is((await errOf(e.suspendDevice(dev)))?.code, 'EIO', 'suspend reports it');
    assert.ok(e.savedDevices().includes('wb'), 'its files and manifest stay');
    const m = JSON.parse(fs.readFileSync(`${cache}/devices/wb.json`, 'utf8'));
    assert.match(m.writebackError, /writing its overlay back to disk failed/);
    const r = await errOf(e.resumeDevice('wb'));
    assert.is(r?.code, 'EIO');
    assert.match(r!.message, /lost writes before it was suspended/);
  } finally { await e.close(); }
});

test('deleting a layer races opening a device on it: never both succeed (300 races, random interleavings)', async () => {
  fs.writeFileSync(`${dir}/small`, makeImage(4, 9));
  let opened = 0, deleted = 0;
  for (let i = 0; i < 300; i++) {
    const layer = (await engine.importImage(`${dir}/small`)).id;
    const delay = (n: number) => new Promise<void>((r) => { let k = n; const step = () => (k-- > 0 ? setImmediate(step) : r()); step(); });
    const d = i % 5;
    const [o, del] = await Promise.allSettled([
      delay(i % 2 ? d : 0).then(() => engine.openDevice(layer)),
      delay(i % 2 ? 0 : d).then(() => engine.deleteLayer(layer)),
    ]);
    assert.ok(o.status === 'rejected' || del.status === 'rejected', `race ${i}: the device opened and its layer was deleted`);
    if (o.status === 'fulfilled') {
      opened++;
      assert.ok((await o.value.read(0, 4 * 4096)).equals(makeImage(4, 9)), `race ${i}: the device reads its layer`);
      assert.match(String((del as PromiseRejectedResult).reason), /EBUSY/);
      await engine.closeDevice(o.value);
      await engine.deleteLayer(layer);
    } else {
      deleted++;
      assert.match(String(o.reason), /ENOENT/);
    }
  }
  console.log(`300 races: ${opened} opened first, ${deleted} deleted first`);
  assert.ok(opened > 0 && deleted > 0, 'both orders happened');
});

test('a second engine cannot share a live cache directory', async () => {
  const cache = `${dir}/cache`;
  const a = await Engine.open({ store: `${dir}/store`, cacheDir: cache });
  try {
    const e = await errOf(Engine.open({ store: `${dir}/store`, cacheDir: cache }));
    assert.is(e?.code, 'EBUSY');
  } finally { await a.close(); }
});

test.run();
