// The shared second cache tier (src/shared-tier.ts): frames written through
// on upload serve other hosts without touching the object store; corrupt
// frames there are dropped and refetched; fetched frames are written back
// after verification; concurrent writers never leave partial files.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import * as path from 'path';
import { Engine, Codec } from '../src/index';
import { FsObjectStore } from '../src/store/fs';
import type { ObjectStore } from '../src/store/types';
import { SharedFrameDir } from '../src/shared-tier';
import { makeImage, tmpdir } from './helpers/util';

let dir: string, img: Buffer, layer: string, nframes: number;
const shared = () => `${dir}/shared`;

/** The store, counting data GETs (frame fetches). */
function counting(): { store: ObjectStore; gets: () => number } {
  const fsStore = new FsObjectStore(`${dir}/store`);
  let n = 0;
  return {
    gets: () => n,
    store: {
      put: (k, d) => fsStore.put(k, d), head: (k) => fsStore.head(k), list: (p) => fsStore.list(p), delete: (k) => fsStore.delete(k),
      get: (k, r) => { if (k.endsWith('/data')) n++; return fsStore.get(k, r); },
    },
  };
}

const frmFiles = () => fs.readdirSync(path.join(shared(), layer)).filter((f) => f.endsWith('.frm'));

test.before(async () => {
  dir = tmpdir('tier2');
  img = makeImage(4096, 13); // 16 MiB
  fs.writeFileSync(`${dir}/img`, img);
  const e = await Engine.open({ store: `${dir}/store`, cacheDir: `${dir}/a`, sharedCacheDir: shared() });
  const r = await e.importImage(`${dir}/img`, { codec: Codec.Zstd });
  layer = r.id;
  nframes = r.header.frames.length;
  await e.close();
});
test.after(() => { fs.rmSync(dir, { recursive: true, force: true }); });

test('import writes every frame through; no temp or lock files remain', () => {
  assert.is(frmFiles().length, nframes);
  assert.equal(fs.readdirSync(path.join(shared(), layer)).filter((f) => !f.endsWith('.frm')), []);
});

test('another host reads the whole device from the shared tier: zero frame GETs from the store', async () => {
  const c = counting();
  const e = await Engine.open({ store: c.store, cacheDir: `${dir}/b`, sharedCacheDir: shared() });
  try {
    const d = await e.openDevice(layer);
    assert.ok((await d.read(0, img.length)).equals(img));
    assert.is(c.gets(), 0);
    assert.is(e.stats().shared!.hits, nframes);
  } finally { await e.close(); }
});

test('a corrupt shared frame is dropped and fetched from the store; the verified copy is written back', async () => {
  const victim = path.join(shared(), layer, frmFiles().sort()[0]);
  const good = fs.readFileSync(victim);
  const bad = Buffer.from(good);
  bad[bad.length >> 1] ^= 0x55;
  fs.writeFileSync(victim, bad);
  const c = counting();
  const e = await Engine.open({ store: c.store, cacheDir: `${dir}/c`, sharedCacheDir: shared() });
  try {
    const d = await e.openDevice(layer);
    assert.ok((await d.read(0, img.length)).equals(img), 'data correct despite the corrupt frame');
    assert.is(c.gets(), 1, 'only the corrupt frame came from the store');
    assert.is(e.stats().shared!.discarded, 1);
  } finally { await e.close(); }
  assert.ok(fs.readFileSync(victim).equals(good), 'written back after verification');
});

test('read misses are written back: an emptied shared tier fills again from store fetches', async () => {
  fs.rmSync(path.join(shared(), layer), { recursive: true, force: true });
  const c = counting();
  const e = await Engine.open({ store: c.store, cacheDir: `${dir}/d`, sharedCacheDir: shared() });
  try {
    const d = await e.openDevice(layer);
    assert.ok((await d.read(0, img.length)).equals(img));
    assert.is(c.gets(), nframes);
  } finally { await e.close(); } // waits for background writes
  assert.is(frmFiles().length, nframes);
});

test('concurrent writers of the same frames (two hosts): whole files only, nothing left behind', async () => {
  const a = new SharedFrameDir(`${dir}/race`), b = new SharedFrameDir(`${dir}/race`);
  const frames = Array.from({ length: 32 }, (_, i) => ({ c: i * 1000, cSize: 300_000 + i, data: Buffer.alloc(300_000 + i, i + 1) }));
  await Promise.all(frames.flatMap((f) => [a.write('L', f, f.data), b.write('L', f, f.data)]));
  for (const f of frames) assert.ok(fs.readFileSync(`${dir}/race/L/${f.c}.frm`).equals(f.data));
  assert.equal(fs.readdirSync(`${dir}/race/L`).filter((n) => !n.endsWith('.frm')), []);
  assert.ok(a.stats.writes + b.stats.writes >= 32);
  // A stale lock (its writer died) does not block the frame forever.
  fs.writeFileSync(`${dir}/race/L/999.frm.lock`, '');
  const old = new Date(Date.now() - 120_000);
  fs.utimesSync(`${dir}/race/L/999.frm.lock`, old, old);
  await a.write('L', { c: 999, cSize: 3 }, Buffer.from('abc'));
  assert.is(fs.readFileSync(`${dir}/race/L/999.frm`, 'utf8'), 'abc');
});

test.run();
