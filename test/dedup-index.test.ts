// The dedup index (version 2): lookups agree with a brute-force map, damage
// is an error rather than a wrong answer, a snapshot reads only the index
// buckets its changed blocks fall in, and layers with a version 1 index
// still dedup.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import { createHash, randomBytes } from 'crypto';
import { Engine, Codec } from '../src/index';
import { encodeIndex, encodeIndexV1, LayerIndex, V2_ENTRY, type Fingerprint } from '../src/fingerprint';
import { FsObjectStore } from '../src/store/fs';
import { keys } from '../src/format';
import { rng, tmpdir, rejects } from './helpers/util';

const B = 4096;
let dir: string;
let e: Engine;
const sum = (b: Buffer) => e.core.checksum(b);
test.before(async () => { dir = tmpdir('dedup-index'); e = await Engine.open({ store: `${dir}/store`, profiles: false }); });
test.after(async () => { await e.close(); fs.rmSync(dir, { recursive: true, force: true }); });

const fpOf = (data: Buffer): Fingerprint => ({ xx: sum(data), sha: createHash('sha256').update(data).digest().subarray(0, 16) });

test('version 2 lookups agree with a brute-force map: hits, misses, and same xxh64 with another sha', async () => {
  const r = rng(1);
  const fps: Fingerprint[] = Array.from({ length: 5000 }, () => fpOf(randomBytes(64)));
  fps[17] = { xx: fps[3].xx, sha: randomBytes(16) }; // an xxh64 collision: only the sha tells them apart
  const store = new FsObjectStore(`${dir}/s1`);
  await store.put('idx', encodeIndex(fps, sum));
  const idx = await LayerIndex.open(store, 'idx', 'l1', sum);
  const probe = [...fps.filter(() => r() < 0.3), ...Array.from({ length: 500 }, () => fpOf(randomBytes(64))), { xx: fps[3].xx, sha: randomBytes(16) }];
  const got = await idx.lookup(probe);
  probe.forEach((p, i) => {
    const want = fps.findIndex((f) => f.xx === p.xx && f.sha.equals(p.sha));
    assert.is(got[i], want, `probe ${i}`);
  });
  assert.ok(idx.memoryBytes < idx.bytes / 4, `directory ${idx.memoryBytes} of ${idx.bytes} bytes in memory`);
});

test('a damaged bucket is an error on lookup, never a wrong location', async () => {
  const fps = Array.from({ length: 3000 }, () => fpOf(randomBytes(64)));
  const store = new FsObjectStore(`${dir}/s2`);
  const bytes = encodeIndex(fps, sum);
  bytes[bytes.length - 5 * V2_ENTRY + 25] ^= 1; // a data block number in the last buckets
  await store.put('idx', bytes);
  const idx = await LayerIndex.open(store, 'idx', 'l2', sum);
  await rejects(idx.lookup(fps), /bucket \d+ checksum mismatch/); // every bucket is asked about
  const dirDamaged = Buffer.from(encodeIndex(fps, sum));
  dirDamaged[40] ^= 1;
  await store.put('idx2', dirDamaged);
  await rejects(LayerIndex.open(store, 'idx2', 'l3', sum), /directory checksum mismatch/);
});

/** The store, counting bytes read from index objects. */
class Counting extends FsObjectStore {
  indexBytes = 0;
  async get(key: string, range?: { offset: number; length: number }): Promise<Buffer> {
    const b = await super.get(key, range);
    if (key.endsWith('/index')) this.indexBytes += b.length;
    return b;
  }
}

test('a snapshot of a small change reads a small part of the template index, and still finds duplicates', async () => {
  const img = Buffer.alloc(32 << 20);
  for (let o = 0; o < img.length; o += B) randomBytes(B).copy(img, o); // 8192 distinct blocks
  fs.writeFileSync(`${dir}/img`, img);
  const store = new Counting(`${dir}/s3`);
  const e1 = await Engine.open({ store, cacheDir: `${dir}/c3`, profiles: false });
  try {
    const tpl = (await e1.importImage(`${dir}/img`, { codec: Codec.Lz4 })).id;
    const indexSize = (await store.head(keys.index(tpl)))!.size;
    const d = await e1.openDevice(tpl);
    // 4 blocks: two copies of template blocks (at other offsets), two new.
    await d.write(0, img.subarray(100 * B, 101 * B));
    await d.write(B, img.subarray(5000 * B, 5001 * B));
    await d.write(2 * B, randomBytes(2 * B));
    store.indexBytes = 0;
    const s = await d.snapshot();
    assert.is(s.stats.dedupBlocks, 2, 'the copies of template blocks are references');
    assert.is(s.stats.storedBlocks, 2);
    assert.ok(store.indexBytes < indexSize / 8, `read ${store.indexBytes} of the template index's ${indexSize} bytes`);
    const e2 = await Engine.open({ store: `${dir}/s3`, profiles: false });
    try {
      const r = await (await e2.openDevice(s.id)).read(0, 4 * B);
      assert.ok(r.subarray(0, B).equals(img.subarray(100 * B, 101 * B)) && r.subarray(B, 2 * B).equals(img.subarray(5000 * B, 5001 * B)));
    } finally { await e2.close(); }
  } finally { await e1.close(); }
});

test('a template whose index is version 1 (written before version 2) still dedups', async () => {
  const img = Buffer.alloc(8 << 20);
  for (let o = 0; o < img.length; o += B) randomBytes(B).copy(img, o);
  fs.writeFileSync(`${dir}/img1`, img);
  const e1 = await Engine.open({ store: `${dir}/s4`, cacheDir: `${dir}/c4`, profiles: false });
  try {
    const tpl = (await e1.importImage(`${dir}/img1`, { codec: Codec.Lz4 })).id;
    // Rewrite its index as version 1, from the blocks in data order.
    const h = await e1.inspect(tpl);
    const fps: Fingerprint[] = [];
    const dev = await e1.openDevice(tpl);
    for (const x of h.extents.filter((x) => x.layer === 0)) {
      for (let o = 0; o < x.len; o += B) fps[(x.data + o) / B] = fpOf(await dev.read(x.dev + o, B));
    }
    await e1.closeDevice(dev);
    await e1.store.put(keys.index(tpl), encodeIndexV1(fps, sum));
    const e2 = await Engine.open({ store: `${dir}/s4`, cacheDir: `${dir}/c5`, profiles: false });
    try {
      const d = await e2.openDevice(tpl);
      await d.write(0, img.subarray(700 * B, 701 * B));
      const s = await d.snapshot();
      assert.is(s.stats.dedupBlocks, 1);
      assert.is(s.stats.storedBlocks, 0);
    } finally { await e2.close(); }
  } finally { await e1.close(); }
});

test.run();
