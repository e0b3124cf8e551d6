// What the write-ahead zero journal costs: WRITE_ZEROES of 64 KiB runs on a
// durable device (record appended and fdatasynced before the hole is
// punched; requests in flight share one sync) against a device that is not
// durable (punch only, no journal: what a durable zeroing cost before the
// record had to reach the disk first), and on a durable device over blocks
// it never wrote (a fresh device's discard: a record, no sync, no hole).
// QD 1 and 16, rounds interleaved.
//   node -r tsx/cjs bench/zeroes.ts   (STRATA_BENCH_ROUNDS)
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { Engine, type Device } from '../src/index';

const ROUNDS = Number(process.env.STRATA_BENCH_ROUNDS ?? 3);
const B = 4096, RUN = 16 * B, SIZE = 256 << 20; // 4096 runs per pass

async function cell(dev: Device, qd: number, written: boolean): Promise<number> {
  // Data first, so each zeroing frees real blocks (or not: a fresh device's discard).
  if (written) await dev.write(0, Buffer.alloc(SIZE, 0x5a));
  // One pass: each 64 KiB run is zeroed once (a second zeroing of a run finds nothing to free).
  let pos = 0;
  const runs = SIZE / RUN;
  const t0 = performance.now();
  await Promise.all(Array.from({ length: qd }, async () => {
    while (pos < runs) await dev.writeZeroes(RUN * pos++, RUN);
  }));
  return runs / ((performance.now() - t0) / 1000);
}

(async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'strata-bench-zeroes-'));
  try {
    fs.writeFileSync(`${dir}/img`, Buffer.alloc(0));
    fs.truncateSync(`${dir}/img`, SIZE);
    const engine = await Engine.open({ store: `${dir}/store`, cacheDir: `${dir}/cache` });
    const layer = (await engine.importImage(`${dir}/img`)).id;
    const res: Record<string, number[]> = {};
    for (let r = 0; r < ROUNDS; r++) {
      for (const qd of [1, 16]) {
        for (const [durable, written] of [[true, true], [false, true], [true, false]]) {
          const dev = await engine.openDevice(layer, { durable });
          const k = `${durable ? `durable (journal synced first)${written ? '' : ', over never-written blocks'}` : 'not durable (punch only)'} QD${qd}`;
          (res[k] ??= []).push(await cell(dev, qd, written));
          await engine.closeDevice(dev);
        }
      }
      process.stderr.write(`round ${r + 1}/${ROUNDS}\n`);
    }
    await engine.close();
    console.log(`WRITE_ZEROES of 64 KiB, one pass over 256 MiB per cell, ${ROUNDS} interleaved rounds, overlay in ${os.tmpdir()}`);
    console.log('| device | QD | ops/s median | min–max | vs not durable |');
    console.log('|---|---|---|---|---|');
    const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1];
    for (const qd of [1, 16]) {
      const ref = med(res[`not durable (punch only) QD${qd}`]);
      for (const k of Object.keys(res).filter((x) => x.endsWith(`QD${qd}`))) {
        const xs = res[k];
        console.log(`| ${k.replace(` QD${qd}`, '')} | ${qd} | ${med(xs).toFixed(0)} | ${Math.min(...xs).toFixed(0)}–${Math.max(...xs).toFixed(0)} | ${(med(xs) / ref).toFixed(2)} |`);
      }
    }
  } finally { fs.rmSync(dir, { recursive: true, force: true }); }
})();
