// Cold start: the fetch queue's order (demand before readahead before
// prefetch, background never taking the last slots), sequential readahead,
// and boot profiles: recorded on a first boot, stored with the layer,
// prefetched in order on a cold host, inherited by snapshots, and ignored
// (with a warning) when corrupt or naming frames a layer does not have.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import { Engine, Codec, type Device } from '../src/index';
import { FetchQueue, Priority } from '../src/fetch-queue';
import { decodeProfile, encodeProfile } from '../src/boot-profile';
import { keys } from '../src/format';
import { CountingStore, makeImage, tmpdir } from './helpers/util';

const B = 4096;
const MiB = 1 << 20;
let dir: string, img: Buffer, base: string, nframes: number;
/** For each frame of the base layer, a device offset whose block it holds. */
let at: number[];

test.before(async () => {
  dir = tmpdir('coldstart');
  img = makeImage(128 * MiB / B, 41);
  fs.writeFileSync(`${dir}/img`, img);
  const e = await Engine.open({ store: `${dir}/store`, profiles: false });
  const { id, header } = await e.importImage(`${dir}/img`, { codec: Codec.Lz4, seedCache: false });
  base = id;
  nframes = header.frames.length;
  at = header.frames.map((f) => {
    const x = header.extents.find((x) => x.layer === 0 && x.data <= f.u && f.u < x.data + x.len)!;
    return x.dev + (f.u - x.data);
  });
  await e.close();
});
test.after(() => { fs.rmSync(dir, { recursive: true, force: true }); });

const tick = () => new Promise((r) => setImmediate(r));

test('fetch queue: demand first, then readahead, then prefetch; background leaves the reserve to demand; promotion', async () => {
  const q = new FetchQueue(4); // reserve 1
  const order: string[] = [];
  const held: Array<() => void> = [];
  const take = (name: string, prio: Priority) => {
    const t = { prio };
    void q.acquire(t).then((rel) => { order.push(name); held.push(rel); });
    return t;
  };
  for (let i = 0; i < 5; i++) take(`p${i}`, Priority.Prefetch);
  await tick();
  assert.equal(order, ['p0', 'p1', 'p2'], 'background stops at limit - reserve');
  take('d0', Priority.Demand);
  await tick();
  assert.equal(order.slice(3), ['d0'], 'demand takes the reserved slot at once');
  take('r0', Priority.Readahead);
  const p4 = { prio: Priority.Prefetch }; // already queued as p3, p4 above; this one is promoted later
  void q.acquire(p4).then((rel) => { order.push('p5'); held.push(rel); });
  take('d1', Priority.Demand);
  q.promote(p4, Priority.Demand);
  held.shift()!(); await tick(); // one slot frees: d1 (demand, FIFO)
  held.shift()!(); await tick(); // p5 (promoted to demand)
  held.shift()!(); await tick(); // r0 (readahead before prefetch)
  held.shift()!(); await tick(); // p3
  assert.equal(order.slice(4), ['d1', 'p5', 'r0', 'p3']);
  assert.is(q.stats.promoted, 1);
});

test('sequential misses read ahead: later frames are fetched before anyone asks', async () => {
  const store = new CountingStore(`${dir}/store`);
  const e = await Engine.open({ store, profiles: false, readaheadFrames: 4 });
  try {
    const d = await e.openDevice(base);
    const frameOf = (k: number) => img.subarray(at[k], at[k] + B);
    assert.ok((await d.read(at[0], B)).equals(frameOf(0)));
    assert.ok((await d.read(at[1], B)).equals(frameOf(1))); // the second miss in a row
    for (let i = 0; i < 200 && e.stats().fetches.active + e.stats().fetches.queued > 0; i++) await new Promise((r) => setTimeout(r, 5));
    assert.is(e.stats().fetches.readahead, 4, JSON.stringify(e.stats().fetches));
    const gets = store.gets;
    for (let k = 2; k <= 5; k++) assert.ok((await d.read(at[k], B)).equals(frameOf(k)));
    assert.is(store.gets, gets, 'frames 2..5 were already cached');
    // A random (non-sequential) miss reads nothing ahead.
    await d.read(at[nframes - 1], B);
    await d.read(at[10], B);
    assert.is(e.stats().fetches.readahead, 4);
  } finally { await e.close(); }
});

test('a first boot records a profile; a cold host prefetches it in order, and a guest miss jumps the queue', async () => {
  const order = [7, 3, 12, 0, 20, 5, 16, 9, 14, 1];
  const a = await Engine.open({ store: new CountingStore(`${dir}/store`), readaheadFrames: 0, profiles: { sampleMs: 5 } });
  try {
    const d = await a.openDevice(base);
    for (const k of order) { await d.read(at[k], B); await new Promise((r) => setTimeout(r, 12)); }
    await a.closeDevice(d);
  } finally { await a.close(); }
  const stored = await a.store.get(keys.profile(base));
  const hdr = await (async () => { const e = await Engine.open({ store: `${dir}/store`, profiles: false }); try { return await e.inspect(base); } finally { await e.close(); } })();
  const p = decodeProfile(stored, [hdr], (b) => BigInt.asUintN(64, xxh(b)));
  assert.equal(p.entries.map((x) => x.frame), order, 'recorded in the order first read');
  assert.is(p.inherited, false);

  // A cold host: every profile frame fetched without being asked; a demand
  // miss on another frame starts while prefetches are still queued.
  const store = new CountingStore(`${dir}/store`);
  store.delayMs = 30;
  const b = await Engine.open({ store, readaheadFrames: 0, fetchConcurrency: 2 });
  try {
    const d = await b.openDevice(base);
    await new Promise((r) => setTimeout(r, 5));
    const other = 25;
    const got = await d.read(at[other], B);
    assert.ok(got.equals(img.subarray(at[other], at[other] + B)));
    const s = b.stats().fetches;
    assert.ok(s.prefetch < order.length, `the guest's miss did not wait for the whole profile (${s.prefetch} of ${order.length} prefetches had started)`);
    for (let i = 0; i < 400 && b.stats().profiles!.prefetched < order.length; i++) await new Promise((r) => setTimeout(r, 10));
    assert.is(b.stats().profiles!.prefetched, order.length);
    const gets = store.gets;
    for (const k of order) assert.ok((await d.read(at[k], B)).equals(img.subarray(at[k], at[k] + B)));
    assert.is(store.gets, gets, 'every profile frame was already cached');
  } finally { await b.close(); }
});

test('a snapshot inherits the profile (refined by what its device read); a device on it records its own', async () => {
  const e = await Engine.open({ store: `${dir}/store`, readaheadFrames: 0, profiles: { sampleMs: 5 } });
  try {
    const d = await e.openDevice(base);
    await d.read(at[30], B);
    await new Promise((r) => setTimeout(r, 30));
    await d.write(0, Buffer.alloc(B, 7));
    const snap = await d.snapshot();
    const child = await e.inspect(snap.id);
    const parent = await e.inspect(base);
    const p = decodeProfile(await e.store.get(keys.profile(snap.id)), [child, parent], (b) => e.core.checksum(b));
    assert.is(p.inherited, true);
    assert.is(p.entries[0].layer, base);
    assert.is(p.entries[0].frame, 30, 'what this device read comes first');
    assert.ok(p.entries.some((x) => x.frame === 7), 'then the parent profile');
    await e.closeDevice(d);
    // A device on the snapshot records its own profile over the inherited one.
    const d2 = await e.openDevice(snap.id);
    await d2.read(0, B);
    await new Promise((r) => setTimeout(r, 30));
    await e.closeDevice(d2);
    await e.profiles!.flush();
    const own = decodeProfile(await e.store.get(keys.profile(snap.id)), [child, parent], (b) => e.core.checksum(b));
    assert.is(own.inherited, false);
    assert.is(own.entries[0].layer, snap.id, 'its first read was of the snapshot\'s own data');
  } finally { await e.close(); }
});

test('recording many devices at once costs one sampling timer, and each still records its own reads', async () => {
  const e = await Engine.open({ store: `${dir}/store`, readaheadFrames: 0, profiles: { sampleMs: 5 } });
  // Counts the intervals started while the devices open (the old recorder started one per device).
  const real = global.setInterval;
  let started = 0;
  global.setInterval = ((...a: Parameters<typeof setInterval>) => { started++; return real(...a); }) as typeof setInterval;
  try {
    const ds: Device[] = [];
    try {
      for (let i = 0; i < 20; i++) ds.push(await e.openDevice(base));
      await new Promise((r) => setTimeout(r, 20));
    } finally { global.setInterval = real; }
    assert.ok(started <= 2, `20 recording devices started ${started} intervals`);
    await ds[3].read(at[12], B);
    await ds[9].read(at[40], B);
    await new Promise((r) => setTimeout(r, 40));
    const rec = (d: Device) => e.profiles!.recorded(d).map((x) => x.frame);
    assert.ok(rec(ds[3]).includes(12) && rec(ds[9]).includes(40), 'each device sees the frames read while it records');
    for (const d of ds) await e.closeDevice(d);
    await e.profiles!.flush();
    assert.is(e.profiles!.recording.size, 0);
  } finally { await e.close(); }
});

test('corrupt, truncated or out-of-range profiles are ignored with a warning; a failed prefetch leaves the frame to demand', async () => {
  const warnings: string[] = [];
  const store = new CountingStore(`${dir}/store`);
  const good = await store.get(keys.profile(base));
  const beyond = encodeProfile({ inherited: false, entries: [{ layer: base, frame: nframes + 3, ms: 0 }] }, [base], (b) => BigInt.asUintN(64, xxh(b)));
  const flipped = Buffer.from(good); flipped[30] ^= 1;
  try {
    for (const [what, bytes] of [['flipped', flipped], ['truncated', good.subarray(0, 20)], ['beyond', beyond]] as const) {
      await store.put(keys.profile(base), bytes);
      const e = await Engine.open({ store, profiles: { onWarning: (m, f) => warnings.push(`${what}: ${m} ${f.error}`) } });
      try {
        const d = await e.openDevice(base);
        assert.ok((await d.read(at[2], B)).equals(img.subarray(at[2], at[2] + B)), `${what}: reads work`);
        assert.is(e.stats().profiles!.invalid, 1, `${what}: counted as invalid`);
        assert.is(e.stats().profiles!.loaded, 0);
      } finally { await e.close(); }
    }
    assert.is(warnings.length, 3, warnings.join('\n'));
    assert.match(warnings[2], /frame \d+ of layer/);

    // A prefetch whose fetch fails: the frame stays absent and a demand read fetches it.
    await store.put(keys.profile(base), good);
    store.failNext = 1;
    store.gets = 0;
    const e = await Engine.open({ store, readaheadFrames: 0 });
    try {
      const d = await e.openDevice(base);
      for (let i = 0; i < 400 && e.stats().profiles!.prefetched < 10; i++) await new Promise((r) => setTimeout(r, 10));
      assert.is(e.stats().cache.fetchErrors, 1, 'one prefetch failed');
      for (let k = 0; k < nframes; k++) assert.ok((await d.read(at[k], B)).equals(img.subarray(at[k], at[k] + B)), `frame ${k}`);
    } finally { await e.close(); }
  } finally { await store.put(keys.profile(base), good); }
});

test('prefetch stops when the device closes', async () => {
  const store = new CountingStore(`${dir}/store`);
  const all = Array.from({ length: nframes }, (_, k) => ({ layer: base, frame: k, ms: k }));
  await store.put(keys.profile(base), encodeProfile({ inherited: false, entries: all }, [base], (b) => BigInt.asUintN(64, xxh(b))));
  store.delayMs = 40;
  store.gets = 0;
  const e = await Engine.open({ store, readaheadFrames: 0, profiles: { depth: 2 } });
  try {
    const d = await e.openDevice(base);
    await new Promise((r) => setTimeout(r, 10));
    await e.closeDevice(d);
    await new Promise((r) => setTimeout(r, 300));
    assert.ok(store.gets <= 4, `prefetch went on after close: ${store.gets} of ${nframes} frames fetched`);
  } finally { await e.close(); }
});

/** xxh64 seed 0, as the engine computes it (one throwaway engine's WASM). */
let xxhEngine: Engine | null = null;
function xxh(b: Buffer): bigint { return xxhEngine!.core.checksum(b); }
test.before(async () => { xxhEngine = await Engine.open({ store: `${dir}/store`, profiles: false }); });
test.after(async () => { await xxhEngine?.close(); });

test.run();
