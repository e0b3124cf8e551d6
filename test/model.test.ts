// Model-based random test: ≥ 10,000 random operations (write, read, trim,
// write-zeroes, flush, snapshot — sometimes with writes racing it — and
// resume on an earlier snapshot) checked byte for byte against a plain
// in-memory model. Prints its seed on failure; rerun with STRATA_SEED=<seed>.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import { Engine, Codec, Device } from '../src/index';
import { makeImage, rng, tmpdir } from './helpers/util';

const SEED = Number(process.env.STRATA_SEED ?? Math.floor(Math.random() * 2 ** 31));
const OPS = Number(process.env.STRATA_MODEL_OPS ?? 10_000);
const BLOCKS = 1024; // 4 MiB devices: small enough for thousands of ops, several frames each

test(`model: ${OPS} random operations (seed ${SEED})`, async () => {
  const r = rng(SEED);
  const int = (n: number) => Math.floor(r() * n);
  const dir = tmpdir('model');
  const imgPath = `${dir}/img`;
  const img = makeImage(BLOCKS, SEED);
  fs.writeFileSync(imgPath, img);
  const engine = await Engine.open({ store: `${dir}/store` });
  let step = 0, lastOp = '';
  try {
    const base = await engine.importImage(imgPath, { codec: r() < 0.5 ? Codec.Zstd : Codec.Lz4 });
    const size = BLOCKS * 4096;
    const snaps: Array<{ id: string; content: Buffer }> = [{ id: base.id, content: Buffer.from(img) }];
    let model = Buffer.from(img);
    let dev: Device = await engine.openDevice(base.id);
    let maxExtents = 0, maxChain = 0;
    const counts: Record<string, number> = {};

    // Offsets/lengths at 512-byte granularity, biased toward block edges and small sizes.
    const range = (maxLen: number) => {
      const len = 512 * (1 + int(r() < 0.7 ? 16 : maxLen / 512));
      const off = Math.min(size - len, 512 * int(size / 512));
      return { off: r() < 0.3 ? off - (off % 4096) : off, len };
    };

    for (step = 0; step < OPS; step++) {
      const p = r();
      if (p < 0.35) {
        const { off, len } = range(128 * 1024);
        const data = Buffer.alloc(len);
        for (let i = 0; i < len; i += 512) data.fill(int(256), i, i + 512);
        lastOp = `write ${off}+${len}`;
        await dev.write(off, data, { fua: r() < 0.05 });
        data.copy(model, off);
      } else if (p < 0.70) {
        const { off, len } = range(256 * 1024);
        lastOp = `read ${off}+${len}`;
        const got = await dev.read(off, len);
        if (!got.equals(model.subarray(off, off + len))) {
          const i = got.findIndex((b, k) => b !== model[off + k]);
          assert.unreachable(`read ${off}+${len} differs from the model at byte ${off + i} (seed ${SEED}, step ${step})`);
        }
      } else if (p < 0.78) {
        const { off, len } = range(64 * 1024);
        lastOp = `zero ${off}+${len}`;
        if (r() < 0.5) await dev.trim(off, len); else await dev.writeZeroes(off, len);
        model.fill(0, off, off + len);
      } else if (p < 0.83) {
        lastOp = 'flush';
        await dev.flush();
      } else if (p < 0.85) {
        // Snapshot with writes racing it: the snapshot must hold exactly the
        // state at the call; the racing writes land in the device only.
        lastOp = 'snapshot';
        const expected = Buffer.from(model);
        const snap = dev.snapshot();
        const racing: Promise<void>[] = [];
        for (let k = 0; k < int(4); k++) {
          const { off, len } = range(16 * 1024);
          const data = Buffer.alloc(len, 1 + int(255));
          racing.push(dev.write(off, data));
          data.copy(model, off);
        }
        const s = await snap;
        await Promise.all(racing);
        snaps.push({ id: s.id, content: expected });
        maxExtents = Math.max(maxExtents, s.header.extents.length);
        maxChain = Math.max(maxChain, s.header.chain.length);
      } else if (p < 0.86 && snaps.length > 1) {
        // Resume: a new device on a random snapshot (often the newest, to grow chains).
        const pick = r() < 0.7 ? snaps[snaps.length - 1] : snaps[int(snaps.length)];
        lastOp = `resume ${pick.id}`;
        await engine.closeDevice(dev);
        dev = await engine.openDevice(pick.id);
        model = Buffer.from(pick.content);
      } else {
        // Random whole-block read of a different shape: a long sequential read.
        const len = 4096 * (1 + int(64));
        const off = 4096 * int(BLOCKS - len / 4096);
        lastOp = `long read ${off}+${len}`;
        const got = await dev.read(off, len);
        if (!got.equals(model.subarray(off, off + len))) {
          const i = got.findIndex((b, k) => b !== model[off + k]);
          assert.unreachable(`long read ${off}+${len} differs at byte ${off + i}: got ${got[i]} want ${model[off + i]} (seed ${SEED}, step ${step})`);
        }
      }
      if (process.env.STRATA_TRACE) console.log(step, lastOp);
      counts[lastOp.split(' ')[0]] = (counts[lastOp.split(' ')[0]] ?? 0) + 1;
    }
    assert.ok((await dev.read(0, size)).equals(model), `final device content (seed ${SEED})`);
    await engine.closeDevice(dev);

    // Every snapshot, opened fresh, reads back exactly what it captured.
    for (const s of snaps) {
      const d = await engine.openDevice(s.id);
      assert.ok((await d.read(0, size)).equals(s.content), `snapshot ${s.id} content (seed ${SEED})`);
      await engine.closeDevice(d);
    }
    // And from a fresh engine (cold cache: everything fetched from the store).
    const cold = await Engine.open({ store: `${dir}/store` });
    try {
      const last = snaps[snaps.length - 1];
      const d = await cold.openDevice(last.id);
      assert.ok((await d.read(0, size)).equals(last.content), `cold read of ${last.id} (seed ${SEED})`);
    } finally { await cold.close(); }

    console.log(`  model: seed ${SEED}, ${OPS} ops ${JSON.stringify(counts)}; ${snaps.length - 1} snapshots, longest chain ${maxChain}, most extents ${maxExtents}`);
    assert.ok(snaps.length > 20, 'the run should take more than 20 snapshots');
    assert.ok(maxChain > 20, `chains should grow past 20 layers (got ${maxChain})`);
    // Normalized mappings stay bounded by the device's block count, far below it in practice.
    assert.ok(maxExtents < BLOCKS, `mapping has ${maxExtents} extents for ${BLOCKS} blocks`);
  } catch (e) {
    console.error(`model test failed: seed ${SEED}, step ${step}, last op ${lastOp}`);
    throw e;
  } finally {
    await engine.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
