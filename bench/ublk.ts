// strata ublk benchmark: `npm run bench:ublk` (boots the QEMU kernels through
// bench/ublk-vm.sh and runs this file inside them; it can also run directly on
// a machine with ublk_drv).
//
// One backing file full of random data; fio (libaio, O_DIRECT) against:
//   ublk-zero-copy  strata UblkDevice on a FileTarget (its queues on the I/O
//                   workers' rings), AUTO_BUF_REG transport (kernel >= 6.16)
//   ublk-user-copy  the same with the USER_COPY transport
//   strata-zero-copy / strata-user-copy
//                   a strata device (the file imported as a layer, its cache
//                   warmed) served by serveUblk: the I/O workers plan every
//                   request with the engine's WASM planner; writes land in the device's overlay
//   strata-prev-zero-copy / strata-prev-user-copy (with STRATA_BENCH_PREV=DIR,
//                   a built checkout of another commit, e.g. a git worktree):
//                   the same strata device served by that checkout's engine
//                   and addon, in this process, for a side-by-side A/B
//   ublk-prev-zero-copy / ublk-prev-user-copy (with STRATA_BENCH_PREV)
//                   that checkout's UblkDevice on a FileTarget
//   loop            the kernel loop driver on the same file (losetup --direct-io=on)
//   ublk-zero-copy-sparse (by name only) bare ublk on a fresh sparse file: first
//                   writes allocate, as in a strata overlay (its reads are of holes)
//   loop-sparse     (by name only) loop on a fresh sparse file, likewise
// Workloads: 4k randread qd32, 4k randwrite qd32 (fresh and filled), 128k read qd8, 128k write qd8.
// Under TCG, user code runs ~17x slower than the kernel, so ratios here are
// biased against the userspace server (see /work/shared/tools/run-in-vm.md).
//
// The machine is noisy (TCG on a shared 2-core VM: the same cell varies by
// ±50 % between runs), so every peer runs every workload in each of
// STRATA_BENCH_ROUNDS rounds, interleaved, and the best round of each cell is
// reported; ratios compare those.
//
// Knobs: STRATA_BENCH_SECONDS (default 6), STRATA_BENCH_FILE_MB (default 256),
// STRATA_BENCH_QUEUES (default: CPUs), STRATA_BENCH_PEERS (subset, comma-separated),
// STRATA_BENCH_ROUNDS (default 2), STRATA_BENCH_TMP (a directory to use instead of a tmpfs of its own),
// STRATA_BENCH_FS (tmpfs, the default, or ext4-ram: see below), STRATA_BENCH_CPU=1
// (CPU per I/O by thread group on each cell's line).
import * as fs from 'fs';
import * as os from 'os';
import { execFile } from 'child_process';
import { features, UblkDevice, FileTarget } from '../src/ublk';
import { Engine, Codec } from '../src/index';
import { serveUblk } from '../src/ublk-export';
import { medianOfRounds } from './rounds';

const SECONDS = Number(process.env.STRATA_BENCH_SECONDS || 6);
const FILE_MB = Number(process.env.STRATA_BENCH_FILE_MB || 256);
const QUEUES = Number(process.env.STRATA_BENCH_QUEUES || Math.min(os.cpus().length, 4));
const DIR = process.env.STRATA_BENCH_TMP || '/tmp/strata-bench-ublk';
// By default the files live on a tmpfs of their own: the guest's /tmp is
// overlayfs (a tmpfs upper over the host's 9p root), which adds a stacking
// layer to every peer's file I/O that a host's cache directory never has.
const OWN_TMPFS = !process.env.STRATA_BENCH_TMP;
// STRATA_BENCH_FS=ext4-ram puts that directory on ext4 over a RAM disk (brd)
// instead: the layout of a host with its cache on a local disk, minus the
// disk's latency. There the loop device does real direct I/O to a block
// device, and io_uring completes buffered ext4 reads inline, while tmpfs
// has no direct I/O and io_uring hands every tmpfs read and write to a worker.
const FS = process.env.STRATA_BENCH_FS || 'tmpfs';
if (!['tmpfs', 'ext4-ram'].includes(FS)) throw new Error(`STRATA_BENCH_FS must be tmpfs or ext4-ram, not ${FS}`);
if (!OWN_TMPFS && process.env.STRATA_BENCH_FS) throw new Error('STRATA_BENCH_FS picks the filesystem the bench mounts for itself; it cannot be combined with STRATA_BENCH_TMP');
const ROUNDS = Math.max(1, Number(process.env.STRATA_BENCH_ROUNDS || 2));

const sh = (cmd: string) => new Promise<string>((res, rej) =>
  execFile('sh', ['-c', cmd], { maxBuffer: 1 << 26, timeout: 600_000 }, (e, out, err) => (e ? rej(new Error(`${cmd}: ${err || e.message}`)) : res(out))));

// '4k randwrite qd32' runs on a fresh device: on a strata device every first
// write to a block allocates a page of the sparse overlay, which the loop
// device and bare ublk (overwriting the full backing file) never do. The
// 'filled' row first writes the whole device sequentially, so every peer
// overwrites allocated space, as storage benchmarks precondition a disk.
const JOBS: { name: string; rw: string; bs: string; qd: number; fill?: boolean }[] = [
  { name: '4k randread qd32', rw: 'randread', bs: '4k', qd: 32 },
  { name: '4k randwrite qd32', rw: 'randwrite', bs: '4k', qd: 32 },
  { name: '4k randwrite qd32, filled', rw: 'randwrite', bs: '4k', qd: 32, fill: true },
  { name: '128k read qd8', rw: 'read', bs: '128k', qd: 8 },
  { name: '128k write qd8', rw: 'write', bs: '128k', qd: 8 },
];

interface Cell { iops: number; mbs: number; p99us: number; cpu?: string }

// STRATA_BENCH_CPU=1: CPU per I/O of the threads that did the work, by
// group — this process's own threads (JS and ublk queue threads), its
// io_uring workers (iou-wrk-*: punted file I/O), and kernel threads
// (kworkers: the loop device's worker) — plus the machine's idle share.
// Threads that exit during the cell (fio's) are not counted.
const CPU = !!process.env.STRATA_BENCH_CPU;
function threadTicks(): Map<string, number> {
  const m = new Map<string, number>();
  for (const pid of fs.readdirSync('/proc').filter((x) => /^\d+$/.test(x))) {
    let tids: string[];
    try { tids = fs.readdirSync(`/proc/${pid}/task`); } catch { continue; }
    for (const tid of tids) {
      try {
        const st = fs.readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
        const comm = st.slice(st.indexOf('(') + 1, st.lastIndexOf(')'));
        const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
        const group = pid === String(process.pid) ? (comm.startsWith('iou-wrk') ? 'io-wq' : 'server') : comm.startsWith('kworker') ? 'kworkers' : 'other';
        m.set(`${group}|${tid}`, Number(f[11]) + Number(f[12]));
      } catch { /* the thread exited */ }
    }
  }
  return m;
}
const idleTicks = () => fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].split(/\s+/).slice(1).map(Number);

async function fio(dev: string, job: typeof JOBS[number]): Promise<Cell> {
  // sync: the fill's dirty pages (buffered in a ublk peer's files) are written
  // back before the cell, not during it, as they never are for loop's direct I/O.
  if (job.fill) await sh(`fio --name=fill --filename=${dev} --direct=1 --ioengine=libaio --rw=write --bs=1M --iodepth=8 --size=${FILE_MB}M && sync`);
  const t0 = CPU ? threadTicks() : undefined, s0 = CPU ? idleTicks() : [];
  const out = await sh(`fio --output-format=json --name=b --filename=${dev} --direct=1 --ioengine=libaio ` +
    `--rw=${job.rw} --bs=${job.bs} --iodepth=${job.qd} --time_based --runtime=${SECONDS} --ramp_time=1 --size=${FILE_MB}M --randrepeat=0`);
  const j = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
  const side = job.rw.includes('read') ? j.read : j.write;
  const p99 = side.clat_ns?.percentile?.['99.000000'] ?? 0;
  let cpu: string | undefined;
  if (t0) {
    const t1 = threadTicks(), s1 = idleTicks();
    const by: Record<string, number> = {};
    for (const [k, v] of t1) { const g = k.split('|')[0]; by[g] = (by[g] ?? 0) + v - (t0.get(k) ?? 0); }
    const ds = s1.map((x, i) => x - s0[i]), total = ds.reduce((a, b) => a + b, 0);
    // The ticks span the whole fio run (ramp included); ios are the measured ones + the ramp's at the same rate.
    const ios = side.iops * (SECONDS + 1), tick = 1e4; // /proc counts USER_HZ (100 Hz) ticks: 10,000 µs each
    cpu = ['server', 'io-wq', 'kworkers'].map((g) => `${g} ${((by[g] ?? 0) * tick / ios).toFixed(1)}`).join(', ') + ` µs/IO; idle ${(100 * ds[3] / total).toFixed(0)} %`;
  }
  return { iops: side.iops, mbs: side.bw_bytes / 1e6, p99us: p99 / 1000, cpu };
}

(async () => {
  let f;
  try {
    f = features();
  } catch (e) {
    console.error(`bench:ublk needs ublk_drv: ${(e as Error).message} (run it through bench/ublk-vm.sh)`);
    process.exit(2);
  }
  fs.rmSync(DIR, { recursive: true, force: true });
  fs.mkdirSync(DIR, { recursive: true });
  // Backing file, store, cache and an overlay per strata device (twice with a second checkout's engine).
  const roomMb = FILE_MB * (process.env.STRATA_BENCH_PREV ? 7 : 4) + 512;
  if (OWN_TMPFS && FS === 'tmpfs') await sh(`mount -t tmpfs -o size=${roomMb}m strata-bench ${DIR}`);
  if (OWN_TMPFS && FS === 'ext4-ram') {
    await sh(`modprobe brd rd_nr=1 rd_size=${roomMb * 1024} max_part=0`);
    await sh(`mkfs.ext4 -q -F /dev/ram0 && mount -t ext4 /dev/ram0 ${DIR}`);
  }
  const fsType = (await sh(`stat -f -c %T ${DIR}`)).trim();
  const img = `${DIR}/backing.img`;
  // Real data: a sparse or fallocated file would serve reads without I/O.
  await sh(`head -c ${FILE_MB << 20} /dev/urandom > ${img}`);
  const kernel = fs.readFileSync('/proc/sys/kernel/osrelease', 'utf8').trim();
  const want = (process.env.STRATA_BENCH_PEERS || 'ublk-zero-copy,ublk-user-copy,strata-zero-copy,strata-user-copy,loop,hop').split(',');
  const target = FileTarget.open(img);
  const engine = await Engine.open({ store: `${DIR}/store`, cacheDir: `${DIR}/cache` });
  const layer = want.some((p) => p.startsWith('strata-')) ? (await engine.importImage(img, { codec: Codec.Lz4 })).id : '';
  // Another checkout's engine (its own addon and WASM), on its own store and cache.
  const PREV = process.env.STRATA_BENCH_PREV;
  const prev = PREV && want.some((p) => p.includes('-prev-')) ? await (async () => {
    const mod = require(`${PREV}/src/index`) as typeof import('../src/index');
    const exp = require(`${PREV}/src/ublk-export`) as typeof import('../src/ublk-export');
    const ublk = require(`${PREV}/src/ublk`) as typeof import('../src/ublk');
    const e = await mod.Engine.open({ store: `${DIR}/store-prev`, cacheDir: `${DIR}/cache-prev` });
    return { engine: e, serveUblk: exp.serveUblk, ublk, layer: want.some((p) => p.startsWith('strata-prev-')) ? (await e.importImage(img, { codec: mod.Codec.Lz4 })).id : '' };
  })() : null;

  // Each peer opens a fresh device per round and closes it after.
  interface Peer { name: string; note?: string; open(): Promise<{ path: string; close(): Promise<string | void> }> }
  const peers: Peer[] = [];
  for (const transport of ['zero-copy', 'user-copy'] as const) {
    const off = transport === 'zero-copy' && !f.zeroCopy ? 'not offered by this kernel' : undefined;
    peers.push({
      name: `ublk-${transport}`, note: off,
      async open() {
        const dev = await UblkDevice.create({ target, transport, queues: QUEUES, depth: 64 });
        return { path: dev.path, close: async () => { const st = dev.stats(); await dev.delete(); return `I/O workers: ${st.fastIos} requests, slow path ${st.slowIos}`; } };
      },
    });
    peers.push({
      name: `ublk-prev-${transport}`, note: off ?? (prev ? undefined : 'needs STRATA_BENCH_PREV (a built checkout)'),
      async open() {
        const t = prev!.ublk.FileTarget.open(img);
        const dev = await prev!.ublk.UblkDevice.create({ target: t, transport, queues: QUEUES, depth: 64 } as never);
        return { path: dev.path, close: async () => { await dev.delete(); t.close(); } };
      },
    });
    for (const which of ['strata', 'strata-prev'] as const) {
      const side = which === 'strata' ? { engine, serveUblk, layer } : prev;
      peers.push({
        name: `${which}-${transport}`, note: off ?? (side ? undefined : 'needs STRATA_BENCH_PREV (a built checkout)'),
        async open() {
          const { engine, serveUblk, layer } = side!;
          const d = await engine.openDevice(layer);
          const dev = await serveUblk(d, { transport, queues: QUEUES, depth: 64 });
          // Warm the template cache; sync so that its writing back is not part of the next cell.
          await sh(`dd if=${dev.path} of=/dev/null bs=1M iflag=direct status=none && sync`);
          return {
            path: dev.path,
            async close() {
              const st = d.nativeStats();
              await dev.delete();
              await engine.closeDevice(d);
              return `served without the engine: ${st.fastReads} reads, ${st.fastWrites} writes; slow: ${st.slowPlans} (gate ${st.slowGate}, busy stripe ${st.slowBusy})`;
            },
          };
        },
      });
    }
  }
  // A file of the device's size with no data: every first write allocates.
  const freshSparse = (name: string) => {
    const file = `${DIR}/${name}`;
    fs.rmSync(file, { force: true });
    fs.closeSync(fs.openSync(file, 'w'));
    fs.truncateSync(file, FILE_MB << 20);
    return file;
  };
  // The kernel loop driver with direct I/O on `file`; close() detaches it.
  const loopOn = async (file: string, after?: () => void) => {
    await sh('modprobe loop 2>/dev/null || true');
    const loop = (await sh(`losetup -f --show --direct-io=on ${file}`)).trim();
    const dio = (await sh(`cat /sys/block/${loop.replace('/dev/', '')}/loop/dio`).catch(() => '?')).trim();
    return { path: loop, close: async () => { await sh(`losetup -d ${loop}`); after?.(); return `${loop}, dio=${dio}`; } };
  };
  // Diagnostic (by name only): bare ublk writing into a fresh sparse file, as a
  // strata overlay does, to tell the cost of first writes from strata's planning.
  peers.push({
    name: 'ublk-zero-copy-sparse', note: f.zeroCopy ? undefined : 'not offered by this kernel',
    async open() {
      const file = freshSparse('sparse.img');
      const t = FileTarget.open(file);
      const dev = await UblkDevice.create({ target: t, transport: 'zero-copy', queues: QUEUES, depth: 64 });
      return { path: dev.path, close: async () => { await dev.delete(); t.close(); fs.rmSync(file, { force: true }); } };
    },
  });
  // Diagnostic (by name only): loop on a fresh sparse file, whose first writes allocate too.
  peers.push({
    name: 'loop-sparse',
    async open() {
      const file = freshSparse('loop-sparse.img');
      return loopOn(file, () => fs.rmSync(file, { force: true }));
    },
  });
  peers.push({ name: 'loop', open: () => loopOn(img) });
  const active = peers.filter((p) => want.includes(p.name));

  // results[peer][job] = best cell over the rounds; perRound[peer][job][round] = IOPS
  const results: Record<string, Record<string, Cell>> = {};
  const perRound: Record<string, Record<string, number[]>> = {};
  const notes: Record<string, string> = {};
  for (let round = 1; round <= ROUNDS; round++) {
    for (const p of active) {
      if (p.note) { notes[p.name] = p.note; continue; }
      const dev = await p.open();
      results[p.name] ??= {};
      for (const job of JOBS) {
        const c = await fio(dev.path, job);
        process.stderr.write(`round ${round} ${p.name} ${job.name}: ${Math.round(c.iops)} IOPS, p99 ${Math.round(c.p99us)} µs${c.cpu ? `; cpu: ${c.cpu}` : ''}\n`);
        ((perRound[p.name] ??= {})[job.name] ??= [])[round - 1] = c.iops;
        const best = results[p.name][job.name];
        if (!best || c.iops > best.iops) results[p.name][job.name] = c;
      }
      const note = await dev.close();
      if (note) notes[p.name] = note;
    }
  }

  // The thread hop: the same 4 KiB reads at queue depth 1, served on the I/O
  // worker vs every request handed to the main thread (alwaysSlow) and answered there.
  const hop: string[] = [];
  if (want.includes('hop')) {
    const qd1 = { name: '4k randread qd1', rw: 'randread', bs: '4k', qd: 1 };
    for (const transport of ['zero-copy', 'user-copy'] as const) {
      if (transport === 'zero-copy' && !f.zeroCopy) continue;
      const lat: Record<string, number> = {};
      for (const alwaysSlow of [false, true]) {
        const dev = await UblkDevice.create({ target, transport, queues: 1, depth: 64, alwaysSlow });
        const c = await fio(dev.path, qd1);
        lat[alwaysSlow ? 'slow' : 'fast'] = 1e6 / c.iops;
        await dev.delete();
      }
      hop.push(`| ${transport} | ${lat.fast.toFixed(1)} µs | ${lat.slow.toFixed(1)} µs | ${(lat.slow - lat.fast).toFixed(1)} µs |`);
    }
    // Context: what one round trip through a block device costs in this VM at all.
    const loop = await peers.find((p) => p.name === 'loop')!.open();
    const c = await fio(loop.path, qd1);
    await loop.close();
    hop.push(`| kernel loop (reference) | ${(1e6 / c.iops).toFixed(1)} µs | — | — |`);
  }
  target.close();
  await engine.close();
  await prev?.engine.close();

  console.log(`\n### ublk vs loop on ${kernel} (QEMU TCG, ${os.cpus().length} vCPU, ${QUEUES} ublk queues, ${FILE_MB} MiB file on ${FS === 'ext4-ram' ? 'ext4 on a RAM disk (brd)' : fsType}, ${SECONDS} s per cell, best of ${ROUNDS} interleaved rounds)\n`);
  const names = active.map((p) => p.name);
  console.log(`| workload | ${names.join(' | ')} |`);
  console.log(`|---|${names.map(() => '---').join('|')}|`);
  for (const job of JOBS) {
    const cells = names.map((n) => {
      const c = results[n]?.[job.name];
      return c ? `${Math.round(c.iops)} IOPS, ${c.mbs.toFixed(1)} MB/s, p99 ${Math.round(c.p99us)} µs` : '—';
    });
    console.log(`| ${job.name} | ${cells.join(' | ')} |`);
  }
  for (const n of names) if (notes[n]) console.log(`\n${n}: ${notes[n]}`);
  if (hop.length) {
    console.log('\n4 KiB reads at queue depth 1, mean time per request: served on the I/O worker vs handed to the main thread (the slow path: a message to the main thread, the JS handler, the answer back to the worker)\n');
    console.log('| transport | I/O worker | via the main thread | hop cost |\n|---|---|---|---|');
    for (const l of hop) console.log(l);
  }
  // The issue's targets, as ratios measured in this boot.
  const iops = (peer: string, job: string) => results[peer]?.[job]?.iops ?? NaN;
  const ratio = (a: number, b: number) => (Number.isFinite(a / b) ? `${(a / b).toFixed(2)}×` : 'not measured');
  // Both best ÷ best and the median of per-round ratios (bench/rounds.ts).
  const row = (label: string, a: string, b: string, job: string) =>
    console.log(`| ${label} | ${ratio(iops(a, job), iops(b, job))} | ${medianOfRounds(perRound[a]?.[job] ?? [], perRound[b]?.[job] ?? [], 'not measured')} |`);
  console.log('\n| target | best ÷ best | median of per-round ratios |\n|---|---|---|');
  for (const [a, b] of [['strata', 'strata-prev'], ['ublk', 'ublk-prev']]) {
    for (const t of ['zero-copy', 'user-copy']) {
      for (const j of JOBS.map((x) => x.name)) row(`${a}-${t} ÷ ${b}-${t} (the native queue threads), ${j} (≥ 0.9×)`, `${a}-${t}`, `${b}-${t}`, j);
    }
  }
  for (const who of ['ublk', 'strata']) {
    for (const j of ['128k read qd8', '128k write qd8']) row(`${who} zero copy ÷ user copy, ${j} (≥ 1.3×)`, `${who}-zero-copy`, `${who}-user-copy`, j);
    for (const j of ['4k randread qd32', '4k randwrite qd32', '4k randwrite qd32, filled']) row(`${who} zero copy ÷ loop, ${j} (≥ 0.8×)`, `${who}-zero-copy`, 'loop', j);
  }
  if (OWN_TMPFS) await sh(`umount ${DIR}`);
  if (OWN_TMPFS && FS === 'ext4-ram') await sh('rmmod brd').catch((e) => console.error(`rmmod brd: ${(e as Error).message}`));
  fs.rmSync(DIR, { recursive: true, force: true });
})().catch((e) => { console.error(e); process.exit(1); });
