// Many devices at once: N devices (64 and 256 by default) on one daemon, each
// with its own NBD connection, all driven by one fio run (a job per device,
// 4 KiB random reads, then random writes, at depth 4 each), and the daemon's
// threads meanwhile. With STRATA_BENCH_PREV=DIR the daemon of another
// checkout (built) runs the same cells, interleaved round by round, so the
// two data planes are compared on one machine in one run.
//   STRATA_BENCH_PREV=/path/to/old/checkout node -r tsx/cjs bench/many-devices.ts
// Knobs: STRATA_BENCH_DEVICES (default 64,256), STRATA_BENCH_SECONDS (10),
// STRATA_BENCH_ROUNDS (3), STRATA_BENCH_IMAGE_MB (256), STRATA_BENCH_TESTS (randread,randwrite).
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { randomBytes } from 'crypto';
import { spawn, spawnSync, type ChildProcess } from 'child_process';
import { ApiClient } from '../src/api/client';
import { importedLayer } from './daemon-log';

const ROOT = path.join(__dirname, '..');
const list = (k: string, d: string) => (process.env[k] ?? d).split(',').map((s) => s.trim()).filter(Boolean);
const DEVICES = list('STRATA_BENCH_DEVICES', '64,256').map(Number);
const TESTS = list('STRATA_BENCH_TESTS', 'randread,randwrite');
const SECONDS = Number(process.env.STRATA_BENCH_SECONDS ?? 10);
const ROUNDS = Number(process.env.STRATA_BENCH_ROUNDS ?? 3);
const IMAGE_MB = Number(process.env.STRATA_BENCH_IMAGE_MB ?? 256);
const PREV = process.env.STRATA_BENCH_PREV;
const log = (m: string) => process.stderr.write(`[bench:many] ${m}\n`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Server { key: string; root: string; data: string; sock: string; child?: ChildProcess; layer?: string }

async function start(s: Server, img: string): Promise<void> {
  fs.mkdirSync(s.data, { recursive: true });
  const logFile = path.join(s.data, 'daemon.log');
  const out = fs.openSync(logFile, 'w');
  s.child = spawn(process.execPath, [path.join(s.root, 'src', 'server.js'), '--data', s.data, '--import', img,
    '--nbd-by-name-max', '4096', '--max-devices', '4096'], { cwd: s.root, stdio: ['ignore', out, out] });
  const child = s.child;
  s.layer = await importedLayer(logFile, () => child.exitCode === null, () => fs.readFileSync(logFile, 'utf8').slice(-2000), 120_000);
  // Warm the layer's template cache (every device reads it).
  spawnSync('nbdcopy', [`nbd+unix:///${s.layer}/warm?socket=${s.sock}`, 'null:'], { stdio: 'inherit' });
  await new ApiClient(path.join(s.data, 'api.sock')).request('DELETE', `/v1/devices/${s.layer.slice(0, 8)}-warm`).catch(() => {});
  log(`${s.key}: started, layer ${s.layer}`);
}

const threadsOf = (pid: number) => Number(/^Threads:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);

/**
 * I/Os per second while every job runs. fio's own figure sums each job's
 * rate over that job's own runtime, so jobs that start seconds apart (their
 * connections, which open devices, come up one after another) look as if
 * they had run together: against the native path 4 s jobs took 11-13 s of
 * wall time. Here fio reports every job each second (--status-interval) and
 * the rate is taken over the longest run of snapshots in which every job
 * made progress.
 */
function commonRate(out: string, n: number): { rate: number; seconds: number; summed: number } {
  const docs: Array<{ t: number; ios: number[]; iops: number }> = [];
  for (const part of out.split(/^(?=\{$)/m)) {
    if (!part.startsWith('{')) continue;
    try {
      const d = JSON.parse(part);
      const jobs = d.jobs as Array<{ read?: { total_ios: number; iops: number }; write?: { total_ios: number; iops: number } }>;
      docs.push({ t: d.timestamp_ms, ios: jobs.map((j) => (j.read?.total_ios ?? 0) + (j.write?.total_ios ?? 0)),
        iops: jobs.reduce((a, j) => a + (j.read?.iops ?? 0) + (j.write?.iops ?? 0), 0) });
    } catch { /* a partial document */ }
  }
  let best = { rate: 0, seconds: 0 };
  for (let a = 0; a < docs.length - 1; a++) {
    let b = a;
    while (b + 1 < docs.length && docs[b + 1].ios.length === n && docs[b].ios.length === n && docs[b + 1].ios.every((x, i) => x > docs[b].ios[i])) b++;
    const secs = (docs[b].t - docs[a].t) / 1000;
    if (b > a && secs > best.seconds) {
      best = { rate: docs[b].ios.reduce((x, y) => x + y, 0) - docs[a].ios.reduce((x, y) => x + y, 0), seconds: secs };
      best.rate /= secs;
    }
  }
  return { ...best, summed: docs.length ? docs[docs.length - 1].iops : 0 };
}

async function cell(s: Server, test: string, n: number, tag: string, dir: string): Promise<{ iops: number; threads: number; summed: number; seconds: number }> {
  const job = [`[global]`, `ioengine=nbd`, `rw=${test}`, `bs=4k`, `iodepth=4`, `time_based`, `runtime=${SECONDS}`,
    `norandommap`, `randrepeat=1`, `thread`, `size=${IMAGE_MB}m`];
  for (let i = 0; i < n; i++) job.push(`[d${i}]`, `uri=nbd+unix:///${s.layer}/${tag}-${i}?socket=${s.sock}`);
  const jobFile = path.join(dir, `${s.key}-${tag}.fio`);
  fs.writeFileSync(jobFile, job.join('\n') + '\n');
  const fio = spawn('fio', ['--output-format=json', '--status-interval=1', jobFile], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  fio.stdout.on('data', (d) => { out += d; });
  let err = '';
  fio.stderr.on('data', (d) => { err = (err + d).slice(-2000); });
  // Threads in the middle of the run, with every connection open.
  let threads = 0;
  const probe = setTimeout(() => { threads = threadsOf(s.child!.pid!); }, (SECONDS * 1000) / 2 + 2000);
  const code = await new Promise<number | null>((r) => fio.on('close', r));
  clearTimeout(probe);
  if (code !== 0 || out.search(/^\{/m) < 0) throw new Error(`fio exited ${code} against ${s.key}, ${n} devices: ${err.trim().split('\n').slice(-8).join('\n')}`);
  const c = commonRate(out, n);
  const api = new ApiClient(path.join(s.data, 'api.sock'));
  for (let i = 0; i < n; i++) await api.request('DELETE', `/v1/devices/${s.layer!.slice(0, 8)}-${tag}-${i}`).catch(() => {});
  return { iops: c.rate, summed: c.summed, seconds: c.seconds, threads };
}

(async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'strata-many-'));
  const img = path.join(dir, 'img');
  fs.writeFileSync(img, randomBytes(IMAGE_MB << 20));
  const servers: Server[] = [{ key: 'strata', root: ROOT, data: path.join(dir, 'a'), sock: path.join(dir, 'a', 'nbd.sock') }];
  if (PREV) servers.push({ key: 'strata-prev', root: path.resolve(PREV), data: path.join(dir, 'b'), sock: path.join(dir, 'b', 'nbd.sock') });
  const results = new Map<string, Array<{ iops: number; threads: number; summed: number; seconds: number }>>();
  try {
    for (const s of servers) await start(s, img);
    for (let r = 0; r < ROUNDS; r++) {
      for (const n of DEVICES) {
        for (const t of TESTS) {
          const order = r % 2 ? [...servers].reverse() : servers;
          for (const s of order) {
            const res = await cell(s, t, n, `r${r}-${t}-${n}`, dir);
            log(`round ${r + 1}: ${s.key} ${t} ${n} devices: ${Math.round(res.iops)} IOPS over ${res.seconds.toFixed(1)} s with every job running (fio's summed rate ${Math.round(res.summed)}), ${res.threads} threads`);
            const k = `${s.key}|${t}|${n}`;
            results.set(k, [...(results.get(k) ?? []), res]);
          }
        }
      }
    }
  } finally {
    for (const s of servers) s.child?.kill('SIGTERM');
    await sleep(2000);
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  const span = (xs: number[]) => `${Math.round(Math.min(...xs)).toLocaleString('en-US')}–${Math.round(Math.max(...xs)).toLocaleString('en-US')}`;
  console.log(`| devices | test | ${servers.map((s) => `${s.key} IOPS, every job running (median; range)`).join(' | ')} | ${PREV ? 'ratio | ' : ''}${servers.map((s) => `${s.key} threads`).join(' | ')} |`);
  console.log(`|---|---|${servers.map(() => '---|').join('')}${PREV ? '---|' : ''}${servers.map(() => '---|').join('')}`);
  for (const n of DEVICES) {
    for (const t of TESTS) {
      const rs = servers.map((s) => results.get(`${s.key}|${t}|${n}`) ?? []);
      const iops = rs.map((x) => x.map((y) => y.iops));
      const cells = iops.map((x) => `${Math.round(med(x)).toLocaleString('en-US')} (${span(x)})`);
      const ratio = PREV ? `${(med(iops[0]) / med(iops[1])).toFixed(2)}× | ` : '';
      console.log(`| ${n} | ${t} 4k QD4 each | ${cells.join(' | ')} | ${ratio}${rs.map((x) => Math.max(...x.map((y) => y.threads))).join(' | ')} |`);
    }
  }
})().catch((e) => { console.error(e); process.exit(1); });
