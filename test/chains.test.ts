// Chains without walls: a device snapshotted hundreds of times (small
// writes, zeroes, trims between snapshots) keeps its chain under the limit
// by compacting, and every snapshot — the last one resumed on a fresh engine
// over the same store, and earlier ones — reads byte for byte as the device
// did when it was taken. `npm run test:chains` runs 10,000 snapshots.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import { createHash, randomBytes } from 'crypto';
import { Engine, Codec } from '../src/index';
import { makeImage, rng, tmpdir } from './helpers/util';

const B = 4096;
const SNAPSHOTS = Number(process.env.STRATA_CHAIN_SNAPSHOTS ?? 300);
const MAX_CHAIN = Number(process.env.STRATA_CHAIN_MAX ?? 8);

test(`${SNAPSHOTS} snapshots of one device stay within a chain of ${MAX_CHAIN}; the last resumes byte for byte on a fresh engine, earlier ones read as they were`, async () => {
  const dir = tmpdir('chains');
  const img = makeImage(2048, 23); // 8 MiB
  fs.writeFileSync(`${dir}/img`, img);
  const e = await Engine.open({ store: `${dir}/store`, cacheDir: `${dir}/c1`, profiles: false, maxChain: MAX_CHAIN });
  try {
    const tpl = (await e.importImage(`${dir}/img`, { codec: Codec.Lz4 })).id;
    const d = await e.openDevice(tpl);
    const model = Buffer.from(img);
    const r = rng(99);
    const int = (n: number) => Math.floor(r() * n);
    const sums = new Map<string, string>(); // snapshot id -> sha256 of the device then
    const every = Math.max(1, Math.floor(SNAPSHOTS / 20));
    let longest = 0, compactions = 0, last = '', prev = 1;
    const t0 = Date.now();
    const fds = () => fs.readdirSync('/proc/self/fd').length;
    let fds0 = 0;
    for (let i = 0; i < SNAPSHOTS; i++) {
      if (i === 10) fds0 = fds();
      for (let k = 0, n = 1 + int(4); k < n; k++) {
        const off = int(model.length / B) * B, len = B * (1 + int(8));
        if (off + len > model.length) continue;
        const what = r();
        if (what < 0.8) { const data = randomBytes(len); await d.write(off, data); data.copy(model, off); }
        else if (what < 0.9) { await d.writeZeroes(off, len); model.fill(0, off, off + len); }
        else { const src = int(model.length / B - 8) * B; const data = Buffer.from(model.subarray(src, src + len)); await d.write(off, data); data.copy(model, off); } // a duplicate
      }
      const s = await d.snapshot();
      if (s.header.chain.length <= prev) compactions++;
      prev = s.header.chain.length;
      longest = Math.max(longest, s.header.chain.length);
      assert.ok(s.header.chain.length <= MAX_CHAIN, `snapshot ${i}: chain of ${s.header.chain.length}`);
      if (i % every === 0 || i === SNAPSHOTS - 1) sums.set(s.id, createHash('sha256').update(model).digest('hex'));
      last = s.id;
    }
    const per = (Date.now() - t0) / SNAPSHOTS;
    assert.ok(compactions > 0, 'compacted');
    // Each snapshot opens a cache for its new layer; the ones no view reads any more are closed,
    // and a layer that stores nothing gets none (they were kept open: two descriptors a
    // snapshot, EMFILE after some thousands).
    await new Promise((res) => setTimeout(res, 300));
    assert.ok(fds() - fds0 < 16, `descriptors grew from ${fds0} to ${fds()} over ${SNAPSHOTS - 10} snapshots`);
    console.log(`  ${SNAPSHOTS} snapshots, ${per.toFixed(1)} ms each; longest chain ${longest}; ${compactions} compactions`);
    assert.ok((await d.read(0, model.length)).equals(model), 'the device itself');
    await e.closeDevice(d);

    // A fresh engine (another host) on the same store: the last snapshot and earlier ones.
    const e2 = await Engine.open({ store: `${dir}/store`, cacheDir: `${dir}/c2`, profiles: false });
    try {
      const lastDev = await e2.openDevice(last);
      assert.ok((await lastDev.read(0, model.length)).equals(model), 'the last snapshot resumed elsewhere reads as the device did');
      for (const [id, sum] of sums) {
        const got = createHash('sha256').update(await (await e2.openDevice(id)).read(0, model.length)).digest('hex');
        assert.is(got, sum, `snapshot ${id}`);
      }
      // What a read costs at chain length 1 (the template) and after all the snapshots (printed, not asserted).
      const cost = async (id: string) => {
        const dev = await e2.openDevice(id);
        await dev.read(0, model.length); // warm
        const rr = rng(5), t = performance.now();
        for (let k = 0; k < 3000; k++) await dev.read(Math.floor(rr() * (model.length / B)) * B, B);
        return (performance.now() - t) / 3000 * 1000;
      };
      const c1 = await cost(tpl), cN = await cost(last);
      console.log(`  4 KiB read (engine path, warm): ${c1.toFixed(1)} µs at chain length 1, ${cN.toFixed(1)} µs after ${SNAPSHOTS} snapshots (${(cN / c1).toFixed(2)}x)`);
    } finally { await e2.close(); }
  } finally {
    await e.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
