import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import {
  CQ_ENTRY, Desc, FLAG_FIXED, FLAG_PUNCH, NATIVE_PATH, NativeError, NativeRing, OP, SQ_ENTRY,
  loadNative, writeDesc,
} from '../src/native';
import { Uring } from '../src/uring';

const native = loadNative();
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'strata-native-'));
const SQ_CAP = 128;
const CQ_CAP = 128;

// One shared wasm memory holds every test's data, as the engine does.
const mem = new WebAssembly.Memory({ initial: 256, maximum: 1024, shared: true });
const heap = new Uint8Array(mem.buffer);
const REGION_A = 1 << 20; // region 0: [1 MiB, 2 MiB)
const REGION_B = 2 << 20; // region 1: [2 MiB, 4 MiB), 4096-aligned for O_DIRECT

interface Harness {
  ring: NativeRing;
  sqView: DataView;
  cqView: DataView;
  next: number;
}

function harness(onComplete?: (n: number) => void): Harness {
  const sq = new SharedArrayBuffer(SQ_CAP * SQ_ENTRY);
  const cq = new SharedArrayBuffer(CQ_CAP * CQ_ENTRY);
  const ring = new native.Ring(32, sq, cq, onComplete);
  assert.is(ring.addRegion(mem.buffer, REGION_A, 1 << 20), 0);
  assert.is(ring.addRegion(mem.buffer, REGION_B, 2 << 20), 1);
  return { ring, sqView: new DataView(sq), cqView: new DataView(cq), next: 0 };
}

const base: Desc = { op: OP.NOP, flags: 0, bufIndex: 0, fd: -1, len: 0, id: 0, bufOffset: 0, fileOffset: 0 };

/** Submits descs and waits for all of them; returns res by id. */
function run(h: Harness, descs: Partial<Desc>[]): Map<number, number> {
  descs.forEach((d, i) => writeDesc(h.sqView, h.next + i, SQ_CAP, { ...base, ...d }));
  assert.is(h.ring.submit(h.next, descs.length), descs.length);
  h.next += descs.length;
  const out = new Map<number, number>();
  while (out.size < descs.length) {
    const n = h.ring.wait(descs.length - out.size);
    for (let i = 0; i < n; i++) out.set(h.cqView.getUint32(i * CQ_ENTRY, true), h.cqView.getInt32(i * CQ_ENTRY + 4, true));
  }
  assert.is(h.ring.inflight, 0);
  return out;
}

function pattern(len: number, seed: number): Uint8Array {
  const p = new Uint8Array(len);
  for (let i = 0; i < len; i++) p[i] = (i * 31 + seed) & 0xff;
  return p;
}

function openTmp(name: string, flags = 'w+'): number {
  return fs.openSync(path.join(dir, name), flags);
}

test('info and pageSize', () => {
  const info = native.info();
  assert.type(info.liburing, 'string');
  for (const op of ['READ', 'WRITE', 'READ_FIXED', 'WRITE_FIXED', 'FSYNC', 'FALLOCATE']) {
    assert.ok(info.probeOps.includes(op), `kernel lacks ${op}`);
  }
  assert.is(native.pageSize(), 4096);
});

test('writeDesc encodes the documented layout', () => {
  const v = new DataView(new SharedArrayBuffer(2 * SQ_ENTRY));
  writeDesc(v, 3, 2, { op: OP.WRITE, flags: FLAG_FIXED, bufIndex: 513, fd: -7, len: 0xfffffffe, id: 0xdeadbeef,
    bufOffset: 2 ** 40 + 5, fileOffset: 2 ** 52 + 3 });
  const o = SQ_ENTRY; // slot 3 % 2
  assert.is(v.getUint8(o), 2);
  assert.is(v.getUint8(o + 1), 1);
  assert.is(v.getUint16(o + 2, true), 513);
  assert.is(v.getInt32(o + 4, true), -7);
  assert.is(v.getUint32(o + 8, true), 0xfffffffe);
  assert.is(v.getUint32(o + 12, true), 0xdeadbeef);
  const u64 = (at: number) => v.getUint32(at, true) + v.getUint32(at + 4, true) * 2 ** 32;
  assert.is(u64(o + 16), 2 ** 40 + 5);
  assert.is(u64(o + 24), 2 ** 52 + 3);
});

test('registerRegions returns 0 as root', () => {
  const h = harness();
  const r = h.ring.registerRegions();
  if (process.getuid?.() === 0) assert.is(r, 0);
  else assert.ok(r === 0 || r < 0, `unexpected ${r}`);
  h.ring.close();
});

test('fixed WRITE then READ_FIXED round-trips through shared wasm memory', () => {
  const h = harness();
  assert.is(h.ring.registerRegions(), 0);
  const fd = openTmp('fixed.bin');
  const data = pattern(64 * 1024, 7);
  heap.set(data, REGION_A + 4096);
  heap.fill(0, REGION_A + 512 * 1024, REGION_A + 512 * 1024 + data.length);
  const w = run(h, [{ op: OP.WRITE, flags: FLAG_FIXED, bufIndex: 0, fd, len: data.length, id: 1, bufOffset: 4096, fileOffset: 8192 }]);
  assert.is(w.get(1), data.length);
  const r = run(h, [{ op: OP.READ, flags: FLAG_FIXED, bufIndex: 0, fd, len: data.length, id: 2, bufOffset: 512 * 1024, fileOffset: 8192 }]);
  assert.is(r.get(2), data.length);
  assert.equal(heap.slice(REGION_A + 512 * 1024, REGION_A + 512 * 1024 + data.length), data);
  // The file really holds the pattern (not just our memory).
  assert.equal(new Uint8Array(fs.readFileSync(path.join(dir, 'fixed.bin')).subarray(8192)), data);
  fs.closeSync(fd);
  h.ring.close();
});

test('fixed flag on unregistered regions falls back to plain ops', () => {
  const h = harness(); // never registered
  const fd = openTmp('fallback.bin');
  const data = pattern(4096, 3);
  heap.set(data, REGION_A);
  const res = run(h, [{ op: OP.WRITE, flags: FLAG_FIXED, bufIndex: 0, fd, len: 4096, id: 5, bufOffset: 0, fileOffset: 0 }]);
  assert.is(res.get(5), 4096);
  assert.equal(new Uint8Array(fs.readFileSync(path.join(dir, 'fallback.bin'))), data);
  fs.closeSync(fd);
  h.ring.close();
});

test('O_DIRECT read into a 4096-aligned region offset', () => {
  const file = path.join(dir, 'direct.bin');
  const data = pattern(3 * 4096, 11);
  fs.writeFileSync(file, data);
  const fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_DIRECT);
  const h = harness();
  assert.is(h.ring.registerRegions(), 0);
  heap.fill(0xee, REGION_B, REGION_B + 3 * 4096);
  const res = run(h, [
    { op: OP.READ, flags: FLAG_FIXED, bufIndex: 1, fd, len: 8192, id: 20, bufOffset: 4096, fileOffset: 4096 },
    // Same read through the non-fixed path.
    { op: OP.READ, flags: 0, bufIndex: 1, fd, len: 4096, id: 21, bufOffset: 3 * 4096, fileOffset: 0 },
  ]);
  assert.is(res.get(20), 8192);
  assert.is(res.get(21), 4096);
  assert.equal(heap.slice(REGION_B + 4096, REGION_B + 3 * 4096), data.subarray(4096));
  assert.equal(heap.slice(REGION_B + 3 * 4096, REGION_B + 4 * 4096), data.subarray(0, 4096));
  assert.is(heap[REGION_B], 0xee, 'bytes before the target were touched');
  fs.closeSync(fd);
  h.ring.close();
});

test('descriptor beyond its region completes with -EFAULT, ring stays usable', () => {
  const h = harness();
  h.ring.registerRegions();
  const fd = openTmp('bounds.bin');
  const res = run(h, [
    { op: OP.READ, flags: FLAG_FIXED, bufIndex: 0, fd, len: 4096, id: 30, bufOffset: (1 << 20) - 100 },
    { op: OP.WRITE, bufIndex: 0, fd, len: 1, id: 31, bufOffset: 2 ** 50 },
    { op: OP.READ, bufIndex: 9, fd, len: 1, id: 32 },
    { op: 99, id: 33 },
    { op: OP.NOP, id: 34 },
  ]);
  assert.is(res.get(30), -14);
  assert.is(res.get(31), -14);
  assert.is(res.get(32), -14);
  assert.is(res.get(33), -22);
  assert.is(res.get(34), 0);
  fs.closeSync(fd);
  h.ring.close();
});

test('bad fd gives -EBADF', () => {
  const h = harness();
  const res = run(h, [
    { op: OP.READ, fd: 987654, len: 16, id: 40 },
    { op: OP.FSYNC, fd: -1, id: 41 },
  ]);
  assert.is(res.get(40), -9);
  assert.is(res.get(41), -9);
  h.ring.close();
});

test('FALLOCATE punch hole reads back as zeros; FSYNC/FDATASYNC succeed', () => {
  const file = path.join(dir, 'punch.bin');
  fs.writeFileSync(file, pattern(64 * 1024, 5));
  const fd = fs.openSync(file, 'r+');
  const h = harness();
  const res = run(h, [
    { op: OP.FALLOCATE, flags: FLAG_PUNCH, fd, id: 50, bufOffset: 16 * 1024, fileOffset: 16 * 1024 },
    { op: OP.FSYNC, fd, id: 51 },
    { op: OP.FDATASYNC, fd, id: 52 },
  ]);
  assert.is(res.get(50), 0);
  assert.is(res.get(51), 0);
  assert.is(res.get(52), 0);
  heap.fill(0xaa, REGION_A, REGION_A + 64 * 1024);
  assert.is(run(h, [{ op: OP.READ, fd, len: 64 * 1024, id: 53 }]).get(53), 64 * 1024);
  const back = heap.subarray(REGION_A, REGION_A + 64 * 1024);
  assert.ok(back.subarray(16 * 1024, 32 * 1024).every((b) => b === 0), 'hole is not zero');
  assert.equal(back.slice(0, 16 * 1024), pattern(64 * 1024, 5).subarray(0, 16 * 1024));
  assert.equal(back.slice(32 * 1024), pattern(64 * 1024, 5).subarray(32 * 1024));
  assert.is(fs.fstatSync(fd).size, 64 * 1024, 'KEEP_SIZE');
  fs.closeSync(fd);
  h.ring.close();
});

test('async mode delivers 64 concurrent completions with the right ids', async () => {
  const fd = openTmp('async.bin');
  const got = new Map<number, number>();
  let h!: Harness;
  let calls = 0;
  const done = new Promise<void>((resolve) => {
    h = harness((n) => {
      calls++;
      for (let i = 0; i < n; i++) got.set(h.cqView.getUint32(i * CQ_ENTRY, true), h.cqView.getInt32(i * CQ_ENTRY + 4, true));
      if (got.size === 64) resolve();
    });
  });
  h.ring.registerRegions();
  for (let i = 0; i < 64; i++) {
    heap.fill(i, REGION_A + i * 4096, REGION_A + (i + 1) * 4096);
    writeDesc(h.sqView, i, SQ_CAP, { ...base, op: OP.WRITE, flags: i & 1 ? FLAG_FIXED : 0, fd, len: 4096,
      id: 1000 + i, bufOffset: i * 4096, fileOffset: i * 4096 });
  }
  h.ring.submit(0, 64);
  assert.is(h.ring.inflight, 64);
  await done;
  assert.ok(calls >= 1);
  for (let i = 0; i < 64; i++) assert.is(got.get(1000 + i), 4096, `id ${1000 + i}`);
  assert.is(h.ring.inflight, 0);
  const file = fs.readFileSync(path.join(dir, 'async.bin'));
  for (let i = 0; i < 64; i++) assert.is(file[i * 4096 + 17], i);
  fs.closeSync(fd);
  h.ring.close();
});

test('async rejected descriptors are delivered through onComplete too', async () => {
  let h!: Harness;
  const res = await new Promise<number>((resolve) => {
    h = harness((n) => { assert.is(n, 1); resolve(h.cqView.getInt32(4, true)); });
    writeDesc(h.sqView, 0, SQ_CAP, { ...base, op: OP.READ, fd: 0, len: 10, id: 7, bufOffset: 1 << 21 });
    h.ring.submit(0, 1);
  });
  assert.is(res, -14);
  h.ring.close();
});

test('ready counts completions waiting to be reaped, rejected ones included, without consuming them', () => {
  const h = harness();
  assert.is(h.ring.ready, 0);
  for (let i = 0; i < 3; i++) writeDesc(h.sqView, i, SQ_CAP, { ...base, id: 80 + i });
  writeDesc(h.sqView, 3, SQ_CAP, { ...base, op: OP.READ, fd: 0, len: 10, id: 83, bufOffset: 1 << 21 }); // -EFAULT
  h.ring.submit(0, 4);
  // NOPs complete inside io_uring_enter; the rejected one never reaches the kernel.
  assert.is(h.ring.ready, 4);
  assert.is(h.ring.ready, 4, 'reading ready consumed nothing');
  assert.is(h.ring.inflight, 4);
  assert.is(h.ring.reap(), 4);
  assert.is(h.ring.ready, 0);
  assert.is(h.ring.inflight, 0);
  h.ring.submit(0, 1);
  h.ring.close();
  assert.is(h.ring.ready, 0, 'a closed ring has nothing to reap');
});

test('Uring: async completions arrive through the eventfd wake-up, not the watchdog', async () => {
  const u = new Uring(mem, { offset: REGION_B, length: 1 << 20 }, 16);
  const fd = openTmp('uring-wakeup.bin');
  try {
    for (let i = 0; i < 20; i++) {
      assert.is(await u.write(fd, i * 4096, 4096, REGION_B), 4096);
      assert.is(await u.fsync(fd), 0); // always io-wq: needs the wake-up
      assert.is(await u.read(fd, i * 4096, 4096, REGION_B + 4096), 4096);
    }
    const all = await Promise.all(Array.from({ length: 32 }, (_, i) => (i & 1 ? u.fsync(fd) : u.read(fd, (i % 20) * 4096, 4096, REGION_B + i * 4096))));
    assert.equal(all, Array.from({ length: 32 }, (_, i) => (i & 1 ? 0 : 4096)));
    assert.ok(u.stats.wakeups >= 20, `wakeups ${u.stats.wakeups}`);
    assert.is(u.stats.watchdogReaps, 0);
    assert.is(u.stats.completed, u.stats.submitted);
  } finally {
    u.close();
    fs.closeSync(fd);
  }
});

// Runs plain JS in a fresh node and requires it to exit on its own.
function child(script: string): { status: number | null; stdout: string; ms: number } {
  const t0 = Date.now();
  const r = spawnSync(process.execPath, ['-e', script], { timeout: 10_000, encoding: 'utf8', env: { ...process.env, NATIVE: NATIVE_PATH, DIR: dir } });
  if (r.status !== 0) console.error(r.stderr);
  return { status: r.status, stdout: r.stdout.trim(), ms: Date.now() - t0 };
}

test('async ring leaves no handle behind: the process exits by itself', () => {
  const r = child(`
    const { Ring } = require(process.env.NATIVE);
    const fs = require('fs');
    const fd = fs.openSync(process.env.DIR + '/child.bin', 'w+');
    const sq = new SharedArrayBuffer(64 * 32), cq = new SharedArrayBuffer(16 * 8);
    const mem = new SharedArrayBuffer(64 * 512);
    const dv = new DataView(sq), cv = new DataView(cq);
    let seen = 0, bad = 0;
    const ring = new Ring(64, sq, cq, (n) => {
      for (let i = 0; i < n; i++) { seen++; if (cv.getInt32(i * 8 + 4, true) !== 512) bad++; }
      if (seen === 64) console.log('done', seen, bad, ring.inflight);
    });
    ring.addRegion(new Uint8Array(mem), 0, mem.byteLength);
    ring.registerRegions();
    for (let i = 0; i < 64; i++) {
      const o = i * 32;
      dv.setUint8(o, 2); dv.setUint8(o + 1, 1); dv.setInt32(o + 4, fd, true); dv.setUint32(o + 8, 512, true);
      dv.setUint32(o + 12, i, true); dv.setUint32(o + 16, i * 512, true); dv.setUint32(o + 24, i * 512, true);
    }
    ring.submit(0, 64);
    // An idle second ring must not keep the process alive either.
    new Ring(4, sq, cq, () => {});
  `);
  assert.is(r.status, 0, 'child did not exit cleanly');
  assert.is(r.stdout, 'done 64 0 0');
  assert.ok(r.ms < 5000, `took ${r.ms} ms`);
});

test('worker threads: sync and async rings tear down with their worker', () => {
  const r = child(`
    const { Worker } = require('worker_threads');
    const src = \`
      const { Ring } = require(process.env.NATIVE);
      const sq = new SharedArrayBuffer(32 * 4), cq = new SharedArrayBuffer(8 * 4);
      const s = new Ring(4, sq, cq);
      new DataView(sq).setUint8(0, 6);
      s.submit(0, 1); s.wait(1);
      const a = new Ring(4, sq, cq, () => {});  // left open on purpose
      a.submit(0, 1);
    \`;
    let exits = 0;
    for (let i = 0; i < 3; i++) new Worker(src, { eval: true }).on('exit', (c) => { if (c === 0) exits++; });
    process.on('exit', () => console.log('exits', exits));
  `);
  assert.is(r.status, 0);
  assert.is(r.stdout, 'exits 3');
});

// A native call that throws while its worker is being stopped cannot throw
// into JavaScript any more (napi_throw fails): the addon must drop the error,
// not let the C++ exception escape and abort the whole process (a ublk-data
// run in CI died this way at exit, after all its tests had passed).
test('a worker stopped inside a throwing native call does not abort the process', () => {
  for (const stop of ['process.exit(0)', 'w.terminate()']) {
    let aborted = 0;
    const runs = 8;
    for (let i = 0; i < runs; i++) {
      const r = child(`
        const { Worker } = require('worker_threads');
        const w = new Worker(\`
          const n = require(process.env.NATIVE);
          require('worker_threads').parentPort.postMessage('go');
          for (;;) { try { n.dup(1 << 30); } catch {} }
        \`, { eval: true });
        w.on('message', () => setTimeout(() => { ${stop}; }, 5));
      `);
      if (r.status !== 0) aborted++;
    }
    assert.is(aborted, 0, `${stop}: ${aborted} of ${runs} runs aborted`);
  }
});

test('errors carry errno and code', () => {
  const sq = new SharedArrayBuffer(SQ_ENTRY * 2);
  const cq = new SharedArrayBuffer(CQ_ENTRY * 2);
  const err = (fn: () => unknown): NativeError => {
    try { fn(); } catch (e) { return e as NativeError; }
    throw new Error('did not throw');
  };
  let e = err(() => new native.Ring(0, sq, cq));
  assert.is(e.errno, 22);
  assert.is(e.code, 'EINVAL');
  e = err(() => new native.Ring(4, { length: 4 } as unknown as SharedArrayBuffer, cq));
  assert.is(e.code, 'EINVAL');
  const ring = new native.Ring(2, sq, cq);
  e = err(() => ring.addRegion(mem.buffer, 0, mem.buffer.byteLength + 1));
  assert.is(e.code, 'EINVAL');
  // Past maxInflight the kernel CQ could overflow: refused up front.
  assert.is(ring.maxInflight, 8);
  new DataView(sq).setUint8(0, OP.NOP);
  new DataView(sq).setUint8(SQ_ENTRY, OP.NOP);
  for (let i = 0; i < 4; i++) ring.submit(0, 2);
  e = err(() => ring.submit(0, 1));
  assert.is(e.code, 'EBUSY');
  assert.is(ring.inflight, 8);
  assert.is(ring.registerRegions(), -16); // EBUSY while in flight
  assert.is(ring.wait(100), 2); // clamped to cq capacity
  ring.close();
  ring.close();
  assert.is(ring.inflight, 0);
  e = err(() => ring.submit(0, 1));
  assert.is(e.errno, 9);
  assert.is(e.code, 'EBADF');
});

test('regions accept ArrayBuffer, Buffer and TypedArray views', () => {
  const h = harness();
  const fd = openTmp('views.bin');
  fs.writeSync(fd, pattern(256, 9), 0, 256, 0);
  const ab = new ArrayBuffer(256);
  const buf = Buffer.alloc(256);
  const u16 = new Uint16Array(new SharedArrayBuffer(1024), 256, 128);
  const ia = h.ring.addRegion(ab, 0, 256);
  const ib = h.ring.addRegion(buf, 0, 256);
  const ic = h.ring.addRegion(u16, 0, 256);
  assert.equal([ia, ib, ic], [2, 3, 4]);
  const res = run(h, [ia, ib, ic].map((bufIndex, i) => ({ op: OP.READ, fd, bufIndex, len: 256, id: 60 + i })));
  assert.equal([...res.values()], [256, 256, 256]);
  const want = pattern(256, 9);
  assert.equal(new Uint8Array(ab), want);
  assert.equal(new Uint8Array(buf), want);
  assert.equal(new Uint8Array(u16.buffer, u16.byteOffset, 256), want);
  // A detached ArrayBuffer's memory is gone: ops on it fail instead of writing there.
  structuredClone(ab, { transfer: [ab] });
  assert.is(run(h, [{ op: OP.READ, fd, bufIndex: ia, len: 1, id: 70 }]).get(70), -14);
  fs.closeSync(fd);
  h.ring.close();
});

test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

test.run();
