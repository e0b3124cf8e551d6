// Density: N devices (1,000 by default) on one daemon, each with an NBD
// connection, reads and writes spread over all of them; what each device
// costs the daemon (threads, RSS, file descriptors, bytes of the engine's one
// wasm32 shared memory), device create and delete latency at that count, and
// how many device-GiB fit before the shared memory (4 GiB at most) is full.
//   node -r tsx/cjs bench/density.ts [--devices 1000] [--size-gib 10] [--seconds 10]
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { randomBytes } from 'crypto';
import { Engine, Codec } from '../src/index';
import { RawClient } from '../test/helpers/nbd-client';
import { call, metrics, startDaemon, waitFor } from '../test/helpers/daemon';

const argv = process.argv.slice(2);
const opt = (name: string, def: string) => { const i = argv.indexOf(name); return i >= 0 && argv[i + 1] ? argv[i + 1] : def; };
const N = Number(opt('--devices', '1000'));
const SIZE_GIB = Number(opt('--size-gib', '10'));
const SECONDS = Number(opt('--seconds', '10'));
const MiB = 1 << 20, GiB = 1 << 30;

function proc(pid: number): { threads: number; rssMiB: number; fds: number } {
  const st = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const num = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(st)![1]);
  return { threads: num('Threads'), rssMiB: num('VmRSS') / 1024, fds: fs.readdirSync(`/proc/${pid}/fd`).length };
}

const pct = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(xs.length * p))];

(async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'strata-bench-density-'));
  const d = { child: null as null | ReturnType<typeof startDaemon> };
  try {
    // A sparse template of SIZE_GIB with 64 MiB of data at its start.
    const img = path.join(dir, 'img');
    const fd = fs.openSync(img, 'w');
    fs.ftruncateSync(fd, SIZE_GIB * GiB);
    fs.writeSync(fd, randomBytes(64 * MiB), 0, 64 * MiB, 0);
    fs.closeSync(fd);
    const e = await Engine.open({ store: path.join(dir, 'store'), profiles: false });
    const tpl = (await e.importImage(img, { codec: Codec.Lz4, seedCache: false })).id;
    await e.close();
    fs.rmSync(img);

    d.child = startDaemon(['--data', path.join(dir, 'data'), '--store', path.join(dir, 'store'), '--frontend', 'nbd',
      '--max-devices', String(N + 10), '--nbd-max-connections', String(N + 10), '--cache-min-free-mib', '0', '--boot-profiles', 'off']);
    await waitFor(d.child, /strata daemon started/);
    const api = { socketPath: path.join(dir, 'data', 'api.sock') };
    const pid = d.child.child.pid!;
    const m0 = await metrics(api), p0 = proc(pid);

    const create: number[] = [];
    for (let i = 0; i < N; i++) {
      const t = performance.now();
      const r = await call(api, 'POST', '/v1/devices', { layer: tpl, id: `d${i}` });
      if (r.status !== 201) throw new Error(`create d${i}: ${r.status} ${r.text}`);
      create.push(performance.now() - t);
      if (i % 100 === 99) process.stderr.write(`${i + 1} devices\n`);
    }
    const m1 = await metrics(api), p1 = proc(pid);

    // One NBD connection per device; random 4 KiB reads and writes over all of them.
    const sock = path.join(dir, 'data', 'nbd.sock');
    const clients: RawClient[] = [];
    for (let i = 0; i < N; i++) clients.push(await RawClient.open(sock, `d${i}`));
    const p2 = proc(pid);
    let ops = 0;
    const end = Date.now() + SECONDS * 1000;
    const buf = randomBytes(4096);
    const lat: number[] = [];
    await Promise.all(Array.from({ length: 32 }, async (_, w) => {
      let k = w;
      while (Date.now() < end) {
        const c = clients[k % N];
        k += 32;
        const off = Math.floor(Math.random() * (SIZE_GIB * GiB / 4096)) * 4096;
        const t = performance.now();
        if (Math.random() < 0.5) await c.read(off, 4096); else await c.write(off, buf);
        lat.push(performance.now() - t);
        ops++;
      }
    }));
    const p3 = proc(pid), m3 = await metrics(api);
    for (const c of clients) c.close();
    await new Promise((r) => setTimeout(r, 500));

    const del: number[] = [];
    for (let i = 0; i < Math.min(N, 200); i++) {
      const t = performance.now();
      const r = await call(api, 'DELETE', `/v1/devices/d${i}`);
      if (r.status !== 204) throw new Error(`delete d${i}: ${r.status} ${r.text}`);
      del.push(performance.now() - t);
    }

    const shmPerDev = (m1.strata_shared_memory_used_bytes - m0.strata_shared_memory_used_bytes) / N;
    const shmBase = m0.strata_shared_memory_used_bytes;
    const perGiB = shmPerDev / SIZE_GIB;
    const ceilingGiB = (4 * GiB - 65536 - m0.strata_shared_memory_reserved_bytes - shmBase) / perGiB;
    console.log(`${N} devices of ${SIZE_GIB} GiB on one daemon (${os.availableParallelism()} CPUs)`);
    console.log('| | before | N devices | + N NBD connections | during I/O | per device |');
    console.log('|---|---|---|---|---|---|');
    console.log(`| threads | ${p0.threads} | ${p1.threads} | ${p2.threads} | ${p3.threads} | ${((p2.threads - p0.threads) / N).toFixed(2)} |`);
    console.log(`| RSS MiB | ${p0.rssMiB.toFixed(0)} | ${p1.rssMiB.toFixed(0)} | ${p2.rssMiB.toFixed(0)} | ${p3.rssMiB.toFixed(0)} | ${((p3.rssMiB - p0.rssMiB) / N * 1024).toFixed(0)} KiB |`);
    console.log(`| fds | ${p0.fds} | ${p1.fds} | ${p2.fds} | ${p3.fds} | ${((p2.fds - p0.fds) / N).toFixed(2)} |`);
    console.log(`| shared memory allocated MiB (plus ${(m0.strata_shared_memory_reserved_bytes / MiB).toFixed(0)} MiB I/O arena) | ${(m0.strata_shared_memory_used_bytes / MiB).toFixed(0)} | ${(m1.strata_shared_memory_used_bytes / MiB).toFixed(0)} | | ${(m3.strata_shared_memory_used_bytes / MiB).toFixed(0)} | ${(shmPerDev / 1024).toFixed(0)} KiB |`);
    console.log(`device create p50 ${pct(create, 0.5).toFixed(1)} ms, p99 ${pct(create, 0.99).toFixed(1)} ms (the ${N}th: ${create[N - 1].toFixed(1)} ms); delete (of ${del.length}) p50 ${pct(del, 0.5).toFixed(1)} ms, p99 ${pct(del, 0.99).toFixed(1)} ms`);
    console.log(`I/O over all ${N} connections, 32 in flight: ${(ops / SECONDS).toFixed(0)} ops/s, 4 KiB latency p50 ${pct(lat, 0.5).toFixed(2)} ms, p99 ${pct(lat, 0.99).toFixed(2)} ms`);
    console.log(`shared memory: ${(perGiB / 1024).toFixed(0)} KiB per device-GiB -> about ${(ceilingGiB / 1024).toFixed(1)} TiB of devices (${Math.floor(ceilingGiB / SIZE_GIB)} devices of ${SIZE_GIB} GiB) before the 4 GiB wasm32 memory is full`);
  } finally {
    d.child?.child.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
})().catch((err) => { console.error(err); process.exit(1); });
