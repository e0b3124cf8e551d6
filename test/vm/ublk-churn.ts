// Runs INSIDE the kernel test VM: create/destroy cycles of a ublk device on
// one FileTarget. Asserts nothing leaks — fds (/proc/self/fd), threads
// (/proc/self/task), kernel devices (/sys/class/ublk-char) — and prints
// create/delete p50/p99 next to `losetup` attach/detach measured in the same VM.
// STRATA_UBLK_CYCLES (default 100) sets the cycle count.
import * as fs from 'fs';
import { UblkDevice, FileTarget } from '../../src/ublk';
import { fdsOn } from '../helpers/util';
import { check, sh, transports, scratchFile, finish, fdCount, threadCount, iouWorkers, ublkDevices, pct, waitFor, begin } from './ublk-helpers';

const DIR = '/tmp/strata-vm-ublk-churn';
const CYCLES = Number(process.env.STRATA_UBLK_CYCLES ?? 100);
const ms = (t: bigint) => Number(process.hrtime.bigint() - t) / 1e6;
const fmt = (xs: number[]) => `p50 ${pct(xs, 50).toFixed(1)} ms, p99 ${pct(xs, 99).toFixed(1)} ms`;

(async () => {
  const { f, t0 } = begin('ublk-churn', DIR);
  const img = `${DIR}/backing.img`;
  scratchFile(img, 64 << 20);
  await sh(`head -c 1048576 /dev/urandom | dd of=${img} conv=notrunc status=none`);
  const target = FileTarget.open(img);
  for (const transport of transports(f)) {
    // Warm-up: libuv's worker pool and lazily loaded modules exist afterwards.
    await (await UblkDevice.create({ target, transport })).delete();
    await waitFor(() => ublkDevices().length === 0, 5000);
    const fds0 = fdCount(), th0 = threadCount(), rss0 = process.memoryUsage().rss;
    const create: number[] = [], del: number[] = [], native: number[] = [];
    const steps: Record<string, number[]> = {};
    let readOk = true;
    for (let i = 0; i < CYCLES; i++) {
      let t = process.hrtime.bigint();
      const dev = await UblkDevice.create({ target, transport });
      create.push(ms(t));
      native.push(dev.info.createMs);
      for (const [k, v] of Object.entries(dev.info.createSteps)) (steps[k] ??= []).push(v);
      if (i % 25 === 0) {
        // The device is usable the moment create() resolves.
        const got = await sh(`dd if=${dev.path} bs=4k count=1 iflag=direct status=none | cmp -n 4096 - ${img} && echo same`).catch(() => '');
        readOk = readOk && got.trim() === 'same';
      }
      t = process.hrtime.bigint();
      await dev.delete();
      del.push(ms(t));
    }
    const gone = await waitFor(() => ublkDevices().length === 0, 10_000);
    check(readOk, `${transport}: every sampled device served correct data right after create()`);
    check(gone, `${transport}: no kernel ublk devices left after ${CYCLES} cycles (${ublkDevices().join(' ') || 'none'})`);
    const fds1 = fdCount(), th1 = threadCount();
    check(fds1 <= fds0, `${transport}: no leaked fds (${fds0} -> ${fds1})`);
    check(th1 <= th0, `${transport}: no leaked threads (${th0} -> ${th1}; io_uring workers now ${iouWorkers()})`);
    console.log(`info ${transport}: rss ${(rss0 / 2 ** 20).toFixed(0)} -> ${(process.memoryUsage().rss / 2 ** 20).toFixed(0)} MiB`);
    console.log(`info ${transport}: create ${fmt(create)} (native ADD..START_DEV ${fmt(native)}); delete ${fmt(del)}`);
    console.log(`info ${transport}: create steps p50: ${Object.entries(steps).map(([k, v]) => `${k} ${pct(v, 50).toFixed(2)}`).join(', ')} ms`);
  }
  target.close();
  // Deleted devices and a closed target hold the file no more (not left to GC).
  const held = fdsOn(img);
  check(held === 0, `the backing file is closed once its devices are deleted and the target closed (${held} fds still open)`);
  // The kernel loop driver through losetup (a process per call, as users run it).
  const loop = await sh(`modprobe loop 2>/dev/null; for i in $(seq 1 ${Math.min(CYCLES, 50)}); do s=$(date +%s%N); d=$(losetup -f --show ${img}) || exit 1; m=$(date +%s%N); losetup -d $d; e=$(date +%s%N); echo "$(( (m - s) / 1000 )) $(( (e - m) / 1000 ))"; done`).catch((e) => (e as Error).message);
  const rows = loop.trim().split('\n').map((l) => l.split(' ').map(Number)).filter((r) => r.length === 2 && r.every(Number.isFinite));
  if (rows.length) console.log(`info losetup (same VM, ${rows.length} cycles): attach ${fmt(rows.map((r) => r[0] / 1000))}; detach ${fmt(rows.map((r) => r[1] / 1000))}`);
  else console.log(`info losetup unavailable: ${loop.slice(0, 200)}`);
  finish('ublk-churn', t0);
})().catch((e) => { console.error(e); process.exit(1); });
