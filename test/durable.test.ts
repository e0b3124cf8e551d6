// Durable devices: a device's overlay survives suspend, restart and crash
// (SIGKILL), including a crash while a snapshot upload was frozen.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import * as path from 'path';
import { spawn } from 'child_process';
import { Engine, Codec } from '../src/index';
import { heldStore, makeImage, rejects, tmpdir } from './helpers/util';

const B = 4096;
let dir: string, img: Buffer, base: string;

test.before(async () => {
  dir = tmpdir('durable');
  img = makeImage(1024, 3);
  fs.writeFileSync(`${dir}/img`, img);
  const e = await Engine.open({ store: `${dir}/store`, cacheDir: `${dir}/c0` });
  base = (await e.importImage(`${dir}/img`, { codec: Codec.Lz4 })).id;
  await e.close();
});
test.after(() => { fs.rmSync(dir, { recursive: true, force: true }); });

/** What the child's writes leave on the device (see helpers/durable-child.ts). */
function expected(afterFreeze: boolean): Buffer {
  const want = Buffer.from(img);
  for (let i = 0; i < 64; i++) want.fill(i + 1, i * 3 * B, i * 3 * B + B);
  want.fill(0, 10 * B, 16 * B);
  want.fill(0xee, 12 * B + 512, 12 * B + 1536);
  if (afterFreeze) want.fill(0x77, 0, B);
  return want;
}

test('suspend on engine close, resume in a new engine: writes, zeroes and partial writes intact; close deletes the files', async () => {
  const cache = `${dir}/c1`;
  let e = await Engine.open({ store: `${dir}/store`, cacheDir: cache });
  const d = await e.openDevice(base, { id: 'dur1', durable: true, meta: { frontend: 'nbd' } });
  await rejects(e.openDevice(base, { id: 'dur1', durable: true }), /EEXIST|EBUSY/);
  await d.write(5 * B, Buffer.alloc(2 * B, 9));
  await d.writeZeroes(100 * B, 10 * B);
  await d.write(101 * B + 512, Buffer.alloc(512, 4));
  const before = await d.read(0, img.length);
  await e.close();
  e = await Engine.open({ store: `${dir}/store`, cacheDir: cache });
  assert.equal(e.savedDevices(), ['dur1']);
  const r = await e.resumeDevice('dur1');
  assert.equal(r.meta, { frontend: 'nbd' });
  assert.ok((await r.read(0, img.length)).equals(before));
  assert.equal(r.zeroMap(100 * B, B)[0].zero, true, 'a zeroed block is still a hole');
  await e.closeDevice(r);
  assert.equal(e.savedDevices(), []);
  assert.equal(fs.readdirSync(`${cache}/devices`).filter((f) => f.startsWith('dur1')), [], 'files removed');
  await e.close();
});

for (const mode of ['plain', 'hang-upload']) {
  test(`SIGKILL ${mode === 'plain' ? 'while serving' : 'while a snapshot upload is frozen'}: resume keeps every acknowledged write`, async () => {
    const cache = `${dir}/c-${mode}`;
    const child = spawn(process.execPath, ['-r', 'tsx/cjs', path.join(__dirname, 'helpers', 'durable-child.ts'), `${dir}/store`, cache, base, 'crash1', mode], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout!.on('data', (c) => { out += c; });
    const t0 = Date.now();
    while (!out.includes('ready') && child.exitCode === null && Date.now() - t0 < 60_000) await new Promise((r) => setTimeout(r, 20));
    assert.ok(out.includes('ready'), out);
    assert.is(child.exitCode, null, 'the child was still running when killed');
    child.kill('SIGKILL');
    if (child.signalCode === null) await new Promise((r) => child.on('exit', r));
    const e = await Engine.open({ store: `${dir}/store`, cacheDir: cache });
    try {
      assert.equal(e.savedDevices(), ['crash1']);
      const d = await e.resumeDevice('crash1');
      const got = await d.read(0, img.length);
      const want = expected(mode === 'hang-upload');
      for (let b = 0; b < img.length / B; b++) {
        assert.ok(got.subarray(b * B, (b + 1) * B).equals(want.subarray(b * B, (b + 1) * B)), `block ${b} after resume`);
      }
      // It keeps working: a snapshot of it holds the same content.
      const s = await d.snapshot();
      const check = await e.openDevice(s.id);
      assert.ok((await check.read(0, img.length)).equals(want));
      await e.closeDevice(check);
      await e.closeDevice(d);
    } finally { await e.close(); }
  });
}

test('a torn zero journal record (a crash mid-append) is ignored, and the next record takes its place', async () => {
  const cache = `${dir}/c-torn`;
  let e = await Engine.open({ store: `${dir}/store`, cacheDir: cache });
  const d = await e.openDevice(base, { id: 'torn', durable: true });
  await d.write(40 * B, Buffer.alloc(4 * B, 0x41));
  await d.writeZeroes(40 * B, 2 * B);
  await e.close();
  const zeros = `${cache}/devices/torn.0.zeros`;
  assert.is(fs.statSync(zeros).size, 16, 'one record');
  fs.appendFileSync(zeros, Buffer.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff])); // 7 bytes of a record that never finished
  e = await Engine.open({ store: `${dir}/store`, cacheDir: cache });
  let r = await e.resumeDevice('torn');
  assert.ok((await r.read(40 * B, 2 * B)).equals(Buffer.alloc(2 * B)), 'the whole record still counts');
  await r.writeZeroes(42 * B, B);
  await e.close();
  assert.is(fs.statSync(zeros).size, 32, 'the new record replaced the torn one');
  e = await Engine.open({ store: `${dir}/store`, cacheDir: cache });
  r = await e.resumeDevice('torn');
  const got = await r.read(40 * B, 4 * B);
  assert.ok(got.subarray(0, 3 * B).equals(Buffer.alloc(3 * B)), 'both zeroed runs');
  assert.ok(got.subarray(3 * B).equals(Buffer.alloc(B, 0x41)), 'the written block after them');
  await e.closeDevice(r);
  await e.close();
});

test('a flush whose fsyncs are queued when an upload ends syncs the frozen overlay it named, not a closed fd (hazard C6)', async () => {
  const { store, release } = heldStore(`${dir}/store`);
  const cache = `${dir}/c-c6`;
  const e = await Engine.open({ store, cacheDir: cache });
  try {
    const d = await e.openDevice(base, { id: 'c6', durable: true });
    await d.write(0, Buffer.alloc(4 * B, 0x36));
    let frozen!: () => void;
    const isFrozen = new Promise<void>((r) => { frozen = r; });
    const snap = d.snapshot({ onFrozen: frozen });
    await isFrozen;
    assert.ok(fs.existsSync(`${cache}/devices/c6.0.overlay`), 'the frozen overlay is generation 0');
    // The flush's fsyncs are queued but not submitted until `go`: the ring
    // is busy, as it may be when the upload ends.
    const uring = (e as unknown as { core: { uring: { fsync: (fd: number) => Promise<number> } } }).core.uring;
    const real = uring.fsync;
    let go!: () => void;
    const queued = new Promise<void>((r) => { go = r; });
    const fds: number[] = [];
    uring.fsync = (fd: number) => { fds.push(fd); return queued.then(() => real.call(uring, fd)); };
    const flushed = d.flush().then(() => null, (err: Error) => err);
    uring.fsync = real;
    assert.ok(fds.length >= 2, `the flush queued fsyncs of both overlays (${fds.length})`);
    release();
    await snap; // the upload ended: the frozen overlay is retired while its fsync waits
    go();
    const err = await flushed;
    assert.is(err, null, `the flush succeeds (${err?.message})`);
    assert.ok(!fs.existsSync(`${cache}/devices/c6.0.overlay`), 'the frozen overlay is deleted once the flush let go of it');
    await d.flush();
    assert.ok((await d.read(0, 4 * B)).equals(Buffer.alloc(4 * B, 0x36)));
  } finally { await e.close(); }
});

test('bad manifests and missing overlays are refused with a reason, not served', async () => {
  const cache = `${dir}/c-bad`;
  let e = await Engine.open({ store: `${dir}/store`, cacheDir: cache });
  await e.openDevice(base, { id: 'bad1', durable: true });
  await e.close();
  fs.rmSync(`${cache}/devices/bad1.0.overlay`);
  e = await Engine.open({ store: `${dir}/store`, cacheDir: cache });
  await rejects(e.resumeDevice('bad1'), /overlay 0 is missing/);
  fs.writeFileSync(`${cache}/devices/bad1.json`, '{"version":1,"id":"bad1","gens":[]}');
  await rejects(e.resumeDevice('bad1'), /invalid manifest/);
  await rejects(e.resumeDevice('nope'), /ENOENT/);
  await rejects(e.resumeDevice('../x'), /EINVAL/);
  await e.close();
});

test.run();
