// The template cache survives the process: frames cached by one engine are
// used by the next one over the same cache directory (after a clean close and
// after SIGKILL) without a store fetch, and nothing on disk is served before
// it verified: flipped bytes, torn or foreign journals and holes are fetched
// again. The scrub finds damage while running; eviction counts restored frames.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import { spawn } from 'child_process';
import { Engine, Codec } from '../src/index';
import { CountingStore, makeImage, tmpdir, rejects } from './helpers/util';
import { bootId, startTime } from '../src/pid';

const B = 4096;
const MiB = 1 << 20;
let dir: string, img: Buffer, base: string;
let FRAMES: number, DATA: number; // the layer's own data (zero and repeated blocks are not stored)
let mapped: { dev: number; data: number }; // a device block whose bytes are in the layer's frame 3

test.before(async () => {
  dir = tmpdir('cache-persist');
  img = makeImage(16 * MiB / B, 33);
  fs.writeFileSync(`${dir}/img`, img);
  const e = await Engine.open({ store: `${dir}/store`, cacheDir: `${dir}/import` });
  const { id, header } = await e.importImage(`${dir}/img`, { codec: Codec.Lz4 });
  base = id;
  FRAMES = header.frames.length;
  DATA = header.dataSize;
  const x = header.extents.find((x) => x.layer === 0 && x.data >= 3 * 2 * MiB && x.data < 4 * 2 * MiB)!;
  mapped = { dev: x.dev, data: x.data };
  await e.close();
});
test.after(() => { fs.rmSync(dir, { recursive: true, force: true }); });

async function readAll(cacheDir: string, store = new CountingStore(`${dir}/store`), opts: { maxBytes?: number } = {}) {
  const e = await Engine.open({ store, cacheDir, cache: opts.maxBytes ? { maxBytes: opts.maxBytes, intervalMs: 60_000 } : undefined });
  const d = await e.openDevice(base);
  const got = await d.read(0, img.length);
  return { e, d, got, store };
}

test('an imported template is still cached after the engine closes: the next engine reads it all with no store fetch', async () => {
  const { e, got, store } = await readAll(`${dir}/import`);
  try {
    assert.ok(got.equals(img), 'contents');
    assert.is(store.gets, 0, 'no frame fetched from the store');
    assert.is(e.stats().cache.restoredFrames, FRAMES, 'every frame verified from disk');
  } finally { await e.close(); }
});

test('fetched frames survive a clean close; a flipped byte and a punched hole are caught and fetched again, never served', async () => {
  const c = `${dir}/clean`;
  const first = await readAll(c);
  assert.ok(first.got.equals(img));
  assert.is(first.store.gets, FRAMES, 'cold: every frame fetched once');
  await first.e.close();

  const again = await readAll(c);
  assert.ok(again.got.equals(img));
  assert.is(again.store.gets, 0, 'warm after restart');
  await again.e.close();

  // Damage two frames while no engine runs: a flipped byte in frame 2, a hole over frame 4.
  const file = fs.readdirSync(`${c}/layers`).find((f) => f.endsWith('.cache'))!;
  const fd = fs.openSync(`${c}/layers/${file}`, 'r+');
  const one = Buffer.alloc(1);
  fs.readSync(fd, one, 0, 1, 2 * 2 * MiB + 12345);
  one[0] ^= 0x5a;
  fs.writeSync(fd, one, 0, 1, 2 * 2 * MiB + 12345);
  fs.writeSync(fd, Buffer.alloc(2 * MiB), 0, 2 * MiB, 4 * 2 * MiB);
  fs.closeSync(fd);
  const after = await readAll(c);
  try {
    assert.ok(after.got.equals(img), 'damaged frames are not served');
    assert.is(after.store.gets, 2, 'exactly the two damaged frames fetched again');
    assert.is(after.e.stats().cache.restoreFailures, 2);
    assert.is(after.e.stats().cache.restoredFrames, FRAMES - 2);
  } finally { await after.e.close(); }
});

test('after SIGKILL the frames the killed process had journaled are reused; a torn journal tail costs nothing else', async () => {
  const c = `${dir}/killed`;
  const child = spawn(process.execPath, ['-r', 'tsx/cjs', `${__dirname}/helpers/cache-child.ts`, `${dir}/store`, c, base, String(img.length)], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on('data', (d) => { if (String(d).includes('persisted')) resolve(); });
    child.on('exit', (code) => reject(new Error(`child exited ${code}`)));
  });
  child.kill('SIGKILL');
  await new Promise((r) => child.once('close', r));
  fs.rmSync(`${c}/engine.lock`, { force: true });
  // A torn record at the tail, as a crash mid-append leaves it.
  const journal = fs.readdirSync(`${c}/layers`).find((f) => f.endsWith('.journal'))!;
  fs.appendFileSync(`${c}/layers/${journal}`, Buffer.from([1, 0, 0, 0, 3, 0, 0]));
  const { e, got, store } = await readAll(c);
  try {
    assert.ok(got.equals(img));
    assert.is(store.gets, 0, 'nothing refetched');
  } finally { await e.close(); }
});

test('a journal from another layer or garbage is not trusted: everything is fetched', async () => {
  const c = `${dir}/garbage`;
  (await readAll(c).then(async (r) => { await r.e.close(); return r; }));
  const journal = fs.readdirSync(`${c}/layers`).find((f) => f.endsWith('.journal'))!;
  const bytes = fs.readFileSync(`${c}/layers/${journal}`);
  bytes[20] ^= 1; // the layer id in the journal's head
  fs.writeFileSync(`${c}/layers/${journal}`, bytes);
  const { e, got, store } = await readAll(c);
  try {
    assert.ok(got.equals(img));
    assert.is(store.gets, FRAMES);
  } finally { await e.close(); }
});

test('the scrub finds a byte flipped under a running engine and drops the frame; the next read fetches it', async () => {
  const c = `${dir}/scrub`;
  const { e, d, store } = await readAll(c);
  try {
    const file = fs.readdirSync(`${c}/layers`).find((f) => f.endsWith('.cache'))!;
    const fd = fs.openSync(`${c}/layers/${file}`, 'r+');
    const want = img.subarray(mapped.dev, mapped.dev + B);
    fs.writeSync(fd, Buffer.from([want[7] ^ 0xff]), 0, 1, mapped.data + 7);
    fs.closeSync(fd);
    assert.not.ok((await d.read(mapped.dev, B)).equals(want), 'served as data before the scrub (the scrub is what finds it)');
    const r = await e.scrub(64 * MiB);
    assert.is(r.failed, 1, `one frame failed: ${JSON.stringify(r)}`);
    assert.is(r.frames, FRAMES);
    const before = store.gets;
    assert.ok((await d.read(0, img.length)).equals(img), 'correct after the scrub');
    assert.is(store.gets - before, 1, 'the dropped frame was fetched again');
  } finally { await e.close(); }
});

test('restored frames count against the cache limit and are evicted first', async () => {
  const c = `${dir}/clean`; // 8 frames cached by the earlier test
  const e = await Engine.open({ store: new CountingStore(`${dir}/store`), cacheDir: c, cache: { maxBytes: 4 * MiB, intervalMs: 60_000 } });
  try {
    const d = await e.openDevice(base);
    // Frame 0 is used (verified from disk); the cache is over its limit with
    // restored frames nobody used, and they are what goes (frame 0 stays).
    assert.ok((await d.read(0, B)).equals(img.subarray(0, B)));
    await e.evictNow();
    const s = e.stats().cache;
    assert.ok(s.cachedBytes <= 4 * MiB && s.evictions >= 1, `within the limit: ${JSON.stringify(s)}`);
    assert.ok((await d.read(0, B)).equals(img.subarray(0, B)));
    assert.is((e.store as CountingStore).gets, 0, 'frame 0 was never fetched');
  } finally { await e.close(); }
});

test('cache files of layers no device has open count too, and are deleted whole when over the limit', async () => {
  const c = `${dir}/killed`; // holds a journaled cache of the base layer
  const before = fs.readdirSync(`${c}/layers`).sort();
  assert.equal(before.filter((f) => f.endsWith('.cache') || f.endsWith('.journal')).length, 2);
  const e = await Engine.open({ store: `${dir}/store`, cacheDir: c, cache: { maxBytes: 1 * MiB, intervalMs: 60_000 } });
  try {
    const freed = await e.evictNow();
    assert.ok(freed >= DATA / 2, `freed ${freed}`);
    assert.equal(fs.readdirSync(`${c}/layers`).filter((f) => f.endsWith('.cache') || f.endsWith('.journal')), []);
  } finally { await e.close(); }
});

test('the cache directory lock: a live owner refuses a second engine; one from before a reboot or whose pid was reused does not', async () => {
  const c = `${dir}/lock`;
  fs.mkdirSync(c, { recursive: true });
  const lock = `${c}/engine.lock`;
  const open = () => Engine.open({ store: `${dir}/store`, cacheDir: c });
  const parent = process.ppid; // alive for the whole test
  // The live owner, as a lock names it: same boot, same start time.
  fs.writeFileSync(lock, `${parent} ${bootId()} ${startTime(parent)}`);
  await rejects(open(), new RegExp(`in use by process ${parent}`));
  fs.writeFileSync(lock, String(parent)); // the older form: a bare pid, by liveness
  await rejects(open(), /in use by process/);
  // After a host reboot the recorded pid can name another live process (pid 1 here).
  for (const stale of [`1 00000000-0000-4000-8000-000000000000 ${startTime(1)}`, `${parent} ${bootId()} 1${startTime(parent)}`, '999999999 - -']) {
    fs.writeFileSync(lock, stale);
    const e = await open();
    try {
      const mine = fs.readFileSync(lock, 'utf8').split(' ');
      assert.equal(mine.slice(0, 2), [String(process.pid), bootId()], `the lock is taken over (${stale})`);
    } finally { await e.close(); }
  }
});

test.run();

