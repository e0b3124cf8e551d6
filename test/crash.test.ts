// Crash consistency: a short run of the crash harness (test/crash; the slow
// lane is `npm run test:crash`), and the crash windows it found, each pinned
// on its own.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import { spawn } from 'child_process';
import { Engine, Codec } from '../src/index';
import { FsObjectStore } from '../src/store/fs';
import * as path from 'path';
import { CRASH_POINTS } from '../src/crash-point';
import { checkLife, runEngineCrashes, runLife, straceAvailable } from './crash/harness';
import { Model } from './crash/model';
import { POINT_OPS, POINTS_SEED } from './crash/points-child';
import { runDaemonCrashes } from './crash/daemon';
import { makeImage, skip, tmpdir } from './helpers/util';

const B = 4096;

test('crash harness: 50 crash points over a durable device (random kills, crash points, pwrite64 kills); every block checked', async () => {
  const seed = Number(process.env.STRATA_CRASH_SEED ?? Date.now() % 1e9);
  console.log(`crash harness seed ${seed} (STRATA_CRASH_SEED=${seed} repeats it)`);
  const s = await runEngineCrashes({ seed, points: 50 });
  console.log(`${s.points} crash points, ${s.opsAcked} ops acknowledged, ${s.inflightAtKill} in flight at a kill, ${s.blocksVerified} blocks and ${s.snapshotsVerified} snapshots verified, ${(s.ms / 1000).toFixed(0)} s`);
  assert.is(s.points, 50);
  assert.ok(s.blocksVerified >= 20 * 512, `lives that read the whole device back: ${s.blocksVerified / 512}`);
  assert.ok(s.opsAcked > 0);
});

test('crash harness through the daemon: 10 SIGKILLs of node src/server.js serving the device over NBD (native path); every block and snapshot checked', async () => {
  const seed = Number(process.env.STRATA_CRASH_SEED ?? Date.now() % 1e9);
  console.log(`daemon crash harness seed ${seed}`);
  const s = await runDaemonCrashes({ seed, points: 10 });
  console.log(`${s.points} daemon kills, ${s.opsAcked} ops acknowledged, ${s.blocksVerified} blocks and ${s.snapshotsVerified} snapshots verified, ${(s.ms / 1000).toFixed(0)} s`);
  assert.is(s.points, 10);
  assert.is(s.blocksVerified, 11 * 512, 'each restart read the whole device back');
});

let dir: string, img: Buffer, base: string;
test.before(async () => {
  dir = tmpdir('crashwin');
  img = makeImage(256, 11);
  for (let b = 0; b < 256; b++) img.fill(0x40 + (b % 64), b * B, b * B + 64); // no template block is all zeros
  fs.writeFileSync(`${dir}/img`, img);
  const e = await Engine.open({ store: `${dir}/store`, cacheDir: `${dir}/c0` });
  base = (await e.importImage(`${dir}/img`, { codec: Codec.Lz4 })).id;
  await e.close();
});
test.after(() => { fs.rmSync(dir, { recursive: true, force: true }); });

test('every crash point, one at a time: the kill lands there, the resumed device keeps every acknowledged op, no stray overlay files', async () => {
  for (const point of CRASH_POINTS) {
    const d = `${dir}/p-${point}`;
    fs.cpSync(`${dir}/store`, `${d}/store`, { recursive: true });
    const model = new Model(img, POINTS_SEED, true);
    model.beginEpoch(1);
    const life = await runLife(process.execPath, ['-r', 'tsx/cjs', path.join(__dirname, 'crash', 'points-child.ts'), `${d}/store`, `${d}/cache`, base],
      { ...process.env, STRATA_CRASH_AT: `${point}:1` }, {}, model, POINT_OPS, point);
    assert.ok(life.hookHit, `${point}: the process died there (${life.acks} ops acknowledged first)`);
    model.killed();
    await checkLife(`${d}/store`, `${d}/cache`, base, 'points', model, `${point}: after resume`);
    const gens: number[] = JSON.parse(fs.readFileSync(`${d}/cache/devices/points.json`, 'utf8')).gens;
    const files = fs.readdirSync(`${d}/cache/devices`).filter((n) => n.startsWith('points.') && !n.endsWith('.json')).sort();
    assert.equal(files, gens.flatMap((g) => [`points.${g}.overlay`, `points.${g}.zeros`]).sort(), `${point}: overlay files are those the manifest names`);
  }
});

test('SIGKILL at the zero journal write: a zeroed block holds its flushed data or zeros, never the template', async () => {
  if (!straceAvailable()) { skip('strace is not installed (apt-get install strace)'); return; }
  const cache = `${dir}/c-zero`;
  // The child writes and flushes blocks 8..15, then zeroes them; its first
  // pwrite64 (the zero journal record) is where strace kills it.
  const script = `
    const { Engine } = require('./src/index');
    (async () => {
      const e = await Engine.open({ store: ${JSON.stringify(`${dir}/store`)}, cacheDir: ${JSON.stringify(cache)} });
      const d = await e.openDevice(${JSON.stringify(base)}, { id: 'z', durable: true });
      await d.write(8 * 4096, Buffer.alloc(8 * 4096, 0xab));
      await d.flush();
      console.log('flushed');
      await d.writeZeroes(8 * 4096, 8 * 4096);
      console.log('zeroed');
      process.exit(0);
    })();`;
  const child = spawn('strace', ['-f', '-qq', '-o', '/dev/null', '-e', 'trace=pwrite64', '-e', 'inject=pwrite64:signal=KILL:when=1',
    process.execPath, '-r', 'tsx/cjs', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout!.on('data', (c) => { out += c; });
  await new Promise((r) => child.on('close', r));
  assert.ok(out.includes('flushed'), `the child got as far as the flush: ${out}`);
  assert.not.ok(out.includes('zeroed'), 'killed before the zeroing was acknowledged');
  const e = await Engine.open({ store: `${dir}/store`, cacheDir: cache });
  try {
    const d = await e.resumeDevice('z');
    const got = await d.read(8 * B, 8 * B);
    for (let b = 0; b < 8; b++) {
      const blk = got.subarray(b * B, (b + 1) * B);
      assert.ok(blk.equals(Buffer.alloc(B, 0xab)) || blk.equals(Buffer.alloc(B)),
        `block ${8 + b}: ${blk.equals(img.subarray((8 + b) * B, (9 + b) * B)) ? 'the template' : 'a third value'}, not its data or zeros`);
    }
    await e.closeDevice(d);
  } finally { await e.close(); }
});

test('a failed snapshot folds its zeroed blocks back durably: still zeros after a restart', async () => {
  const cache = `${dir}/c-fold`;
  const fsStore = new FsObjectStore(`${dir}/store`);
  const failing = Object.assign(Object.create(fsStore), {
    put: (k: string, d: Uint8Array | AsyncIterable<Uint8Array>) => (k.endsWith('/data') ? Promise.reject(new Error('injected upload failure')) : fsStore.put(k, d)),
  });
  let e = await Engine.open({ store: failing, cacheDir: cache });
  const d = await e.openDevice(base, { id: 'f', durable: true });
  await d.write(3 * B, Buffer.alloc(B, 0x33));
  await d.writeZeroes(20 * B, 4 * B);                       // ZERO in the overlay that the snapshot freezes
  let failed = false;
  await d.snapshot().catch(() => { failed = true; });         // upload fails: folded back into the new overlay
  assert.ok(failed, 'the snapshot failed');
  assert.ok((await d.read(20 * B, 4 * B)).equals(Buffer.alloc(4 * B)), 'zeros before the restart');
  await e.close();                                           // suspends the durable device
  e = await Engine.open({ store: `${dir}/store`, cacheDir: cache });
  try {
    const r = await e.resumeDevice('f');
    assert.ok((await r.read(3 * B, B)).equals(Buffer.alloc(B, 0x33)), 'the written block');
    const z = await r.read(20 * B, 4 * B);
    assert.ok(z.equals(Buffer.alloc(4 * B)), `zeroed blocks after the restart: ${z.equals(img.subarray(20 * B, 24 * B)) ? 'the template' : 'a third value'}`);
    await e.closeDevice(r);
  } finally { await e.close(); }
});

test.run();
