// ublk density: N strata devices served over ublk by one process, and what
// they cost it: threads, file descriptors, RSS, create and delete latency.
// With STRATA_BENCH_PREV=<built checkout> the same run in that checkout's
// engine and addon (e.g. one whose ublk queues were native threads), side
// by side. Runs where ublk_drv is loaded (the kernel lane's VMs):
//   scripts/vm/run-in-vm.sh --kernel 7.3 --modules ublk_drv --mem 2048 -- \
//     node -r tsx/cjs bench/ublk-density.ts [--devices 10,100,1000] [--depth 8] [--transport zero-copy]
import * as fs from 'fs';
import * as path from 'path';

const argv = process.argv.slice(2);
const opt = (name: string, def: string) => { const i = argv.indexOf(name); return i >= 0 && argv[i + 1] ? argv[i + 1] : def; };
const COUNTS = opt('--devices', '10,100').split(',').map(Number);
const DEPTH = Number(opt('--depth', '8'));
const TRANSPORT = opt('--transport', 'zero-copy') as 'zero-copy' | 'user-copy';
const DIR = '/tmp/strata-bench-ublk-density';

function self(): { threads: number; fds: number; rssMiB: number } {
  const st = fs.readFileSync('/proc/self/status', 'utf8');
  const num = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(st)![1]);
  return { threads: num('Threads'), fds: fs.readdirSync('/proc/self/fd').length, rssMiB: num('VmRSS') / 1024 };
}
const pct = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(xs.length * p))];

async function run(label: string, root: string): Promise<void> {
  const { Engine, Codec } = require(path.join(root, 'src/index')) as typeof import('../src/index');
  const { serveUblk } = require(path.join(root, 'src/ublk-export')) as typeof import('../src/ublk-export');
  const dir = `${DIR}/${label}`;
  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(dir, { recursive: true });
  const img = `${dir}/img`;
  fs.writeFileSync(img, Buffer.alloc(16 << 20, 7));
  const e = await Engine.open({ store: `${dir}/store`, cacheDir: `${dir}/cache`, profiles: false });
  const layer = (await e.importImage(img, { codec: Codec.Lz4 })).id;
  const base = self();
  for (const n of COUNTS) {
    const devs: Array<{ d: Awaited<ReturnType<typeof e.openDevice>>; u: Awaited<ReturnType<typeof serveUblk>> }> = [];
    const create: number[] = [];
    for (let i = 0; i < n; i++) {
      const t = performance.now();
      const d = await e.openDevice(layer);
      const u = await serveUblk(d, { transport: TRANSPORT, queues: 1, depth: DEPTH });
      create.push(performance.now() - t);
      devs.push({ d, u });
    }
    // One read through every device: each is served. Asynchronous: a read
    // the workers hand to the engine needs this thread to answer it.
    const buf = Buffer.alloc(4096);
    for (const { u } of devs) { const f = await fs.promises.open(u.path, 'r'); await f.read(buf, 0, 4096, 0); await f.close(); }
    const at = self();
    const del: number[] = [];
    for (const { d, u } of devs) { const t = performance.now(); await u.delete(); await e.closeDevice(d); del.push(performance.now() - t); }
    console.log(`| ${label} | ${n} | ${base.threads} → ${at.threads} | ${base.fds} → ${at.fds} | ${base.rssMiB.toFixed(0)} → ${at.rssMiB.toFixed(0)} MiB | ${pct(create, 0.5).toFixed(1)} / ${pct(create, 0.99).toFixed(1)} ms | ${pct(del, 0.5).toFixed(1)} / ${pct(del, 0.99).toFixed(1)} ms |`);
  }
  await e.close();
}

(async () => {
  console.log(`\n### ublk density (${TRANSPORT}, 1 queue, depth ${DEPTH}, kernel ${fs.readFileSync('/proc/sys/kernel/osrelease', 'utf8').trim()})\n`);
  console.log('| checkout | devices | threads | fds | RSS | create p50 / p99 | delete p50 / p99 |\n|---|---:|---|---|---|---|---|');
  await run('this', path.join(__dirname, '..'));
  if (process.env.STRATA_BENCH_PREV) await run('prev', process.env.STRATA_BENCH_PREV);
  process.exit(0);
})().catch((e) => { console.error(e); process.exit(1); });
