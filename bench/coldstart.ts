// Cold start: the block trace of a real boot (a Debian guest booting from
// strata under QEMU, recorded by `npm run test:sandbox`) replayed against a
// device on the same image, from:
//   (a) a warm cache;
//   (b) a cold cache over a store with injected first-byte latency and a
//       per-stream bandwidth cap, fetching on miss only (no readahead, no
//       profile: strata before boot profiles, and e2b's NBD path);
//   (r) the same with sequential readahead only;
//   (c) the same with the boot profile (recorded by an earlier replay, as a
//       first boot records it) and readahead;
//   (d) a warm cache after the engine restarted (the persistent cache).
// The replay keeps the trace's order and concurrency: requests the guest
// issued together (within 0.2 ms) go out together and the next batch waits
// for them; the guest's think time between batches is dropped, so the replay
// is I/O-bound (the harsher case for a cold cache). Rounds interleave cells.
//   npm run bench:coldstart [-- --rounds N --latency 20,50 --mibps 64 --concurrency 16]
//   (the trace comes from npm run test:sandbox, run first when absent)
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';
import { Engine, type Device } from '../src/index';
import { parseCodec, codecName } from '../src/format';
import { compress } from '../src/codec';
import { FsObjectStore } from '../src/store/fs';
import type { ObjectInfo, ObjectStore } from '../src/store/types';

const argv = process.argv.slice(2);
const opt = (name: string, def: string) => { const i = argv.indexOf(name); return i >= 0 && argv[i + 1] ? argv[i + 1] : def; };
const ROUNDS = Number(opt('--rounds', process.env.STRATA_BENCH_ROUNDS ?? '3'));
const LATENCIES = opt('--latency', '20,50').split(',').map(Number);
const MIBPS = Number(opt('--mibps', '64'));
const CONCURRENCY = opt('--concurrency', '16').split(',').map(Number);
const CODEC = parseCodec(opt('--codec', 'zstd')); // the child cells only warm their workers with it
// The trace was recorded under TCG, where guest code runs ~17x slower than
// under KVM: paced replays keep the guest's think time divided by this.
const PACE = 1 / Number(opt('--tcg-factor', '17'));
const ROOT = path.join(__dirname, '..');
const MiB = 1 << 20;

/** The filesystem store behind first-byte latency and a per-stream bandwidth cap (each ranged GET is a stream). */
class SlowStore implements ObjectStore {
  gets = 0;
  bytes = 0;
  constructor(private readonly inner: ObjectStore, private readonly latencyMs: number, private readonly bytesPerSec: number) {}
  async get(key: string, range?: { offset: number; length: number }): Promise<Buffer> {
    const b = await this.inner.get(key, range);
    if (key.endsWith('/data')) { this.gets++; this.bytes += b.length; }
    await new Promise((r) => setTimeout(r, this.latencyMs + (b.length / this.bytesPerSec) * 1000));
    return b;
  }
  async head(key: string): Promise<ObjectInfo | null> { await new Promise((r) => setTimeout(r, this.latencyMs)); return this.inner.head(key); }
  put(key: string, data: Uint8Array | AsyncIterable<Uint8Array>): Promise<void> { return this.inner.put(key, data); }
  list(prefix: string): Promise<ObjectInfo[]> { return this.inner.list(prefix); }
  delete(key: string): Promise<void> { return this.inner.delete(key); }
}

type Req = [number, number, number, number]; // ms, offset, length, write

/** Requests grouped into the batches the guest issued together. */
function batches(reqs: Req[]): Req[][] {
  const out: Req[][] = [];
  let last = -Infinity;
  for (const r of reqs) {
    if (r[0] - last > 0.2 || !out.length) out.push([]);
    out[out.length - 1].push(r);
    last = r[0];
  }
  return out;
}

/**
 * Replays batches in order, each after the previous completed; with `pace`,
 * also not before its original issue time scaled by `pace` (the guest's
 * think time kept, scaled), else at once (I/O-bound).
 */
async function replay(dev: Device, bs: Req[][], pace = 0): Promise<number> {
  const t0 = performance.now();
  const junk = Buffer.alloc(1 << 20, 0x6b);
  for (const b of bs) {
    const wait = t0 + b[0][0] * pace - performance.now();
    if (pace && wait > 0) await new Promise((r) => setTimeout(r, wait));
    await Promise.all(b.map(([, off, len, w]) => {
      if (off + len > dev.size) return Promise.resolve();
      if (!w) return dev.read(off, len);
      return dev.write(off, len <= junk.length ? junk.subarray(0, len) : Buffer.alloc(len, 0x6b));
    }));
  }
  return performance.now() - t0;
}

function sandboxImage(): string {
  const r = spawnSync('bash', [path.join(ROOT, 'scripts/sandbox/image.sh')], { encoding: 'utf8' });
  const img = r.stdout.trim().split('\n').pop() ?? '';
  if (r.status !== 0 || !fs.existsSync(img)) throw new Error(`scripts/sandbox/image.sh failed (exit ${r.status}): ${(r.stderr || r.stdout).slice(-800)}`);
  return img;
}

interface Cell { ms: number[]; frames: number[]; bytes: number[] }

const MODES: Array<[string, number]> = [[' (I/O-bound)', 0], [` (paced: think time / ${Math.round(1 / PACE)})`, PACE]];

/** A running daemon's workers are warm: give a fresh engine's pool some work first (WASM tier-up, codec load). */
async function warmWorkers(e: Engine): Promise<void> {
  const h = e.core.heap;
  const p = h.alloc(2 << 20), out = h.alloc(2 << 20);
  const frame = Buffer.from(compress(CODEC, Buffer.alloc(2 << 20, 1), 3));
  h.u8.set(frame, p);
  const checksum = e.core.checksum(frame).toString(16);
  try {
    // Both workers load the codec and tier up their WASM, as in a daemon that has been running.
    for (let i = 0; i < 40; i++) {
      await Promise.all([0, 1].map(() => e.core.run({ op: 'unframe', codec: CODEC, cPtr: p, cSize: frame.length, checksum, outPtr: out, uSize: 2 << 20 })));
      await Promise.all([0, 1].map(() => e.core.run({ op: 'hash', ptr: out, len: 2 << 20 })));
    }
  } finally { h.free(p); h.free(out); }
}

interface CellSpec { cacheDir: string; warmFirst: boolean; pace: number; latencyMs: number; readahead: number; profile: boolean; concurrency: number }
interface CellResult { ms: number; frames: number; bytes: number }

/**
 * Each cell runs in a process of its own (this file with --cell): engines an
 * earlier cell closed (their threads, their shared memory) cannot slow it.
 */
type FullSpec = CellSpec & { storeDir: string; layer: string; traceFile: string; mibps: number };
function runCell(spec: FullSpec): CellResult {
  const r = spawnSync(process.execPath, ['-r', 'tsx/cjs', __filename, '--cell', JSON.stringify(spec)], { encoding: 'utf8', maxBuffer: 1 << 24 });
  const line = r.stdout.split('\n').find((l) => l.startsWith('{'));
  if (r.status !== 0 || !line) throw new Error(`cell ${JSON.stringify(spec)} failed (exit ${r.status}): ${r.stderr.slice(-1500)}`);
  return JSON.parse(line) as CellResult;
}

async function cellMain(spec: FullSpec): Promise<void> {
  const bs = batches((JSON.parse(fs.readFileSync(spec.traceFile, 'utf8')) as { requests: Req[] }).requests);
  const s = new SlowStore(new FsObjectStore(spec.storeDir), spec.latencyMs, spec.mibps * MiB);
  const e = await Engine.open({ store: s, cacheDir: spec.cacheDir, profiles: spec.profile ? { windowMs: 1 } : false,
    readaheadFrames: spec.readahead, fetchConcurrency: spec.concurrency });
  try {
    await warmWorkers(e);
    if (spec.warmFirst) await replay(await e.openDevice(spec.layer), bs);
    const fetches = e.stats().cache.fetches, bytes = s.bytes;
    const ms = await replay(await e.openDevice(spec.layer), bs, spec.pace);
    process.stdout.write(`${JSON.stringify({ ms, frames: e.stats().cache.fetches - fetches, bytes: s.bytes - bytes })}\n`);
  } finally { await e.close(); }
}

(async () => {
  if (argv[0] === '--cell') return cellMain(JSON.parse(argv[1]));
  const image = sandboxImage();
  const traceFile = path.join(path.dirname(image), 'boot-trace.json');
  if (!fs.existsSync(traceFile)) {
    console.error(`no boot trace at ${traceFile}: running npm run test:sandbox to record one`);
    const r = spawnSync(process.execPath, ['-r', 'tsx/cjs', path.join(ROOT, 'test/sandbox/run.ts')], { stdio: 'inherit' });
    if (r.status !== 0 || !fs.existsSync(traceFile)) { console.error('the sandbox flow did not record a trace'); process.exit(1); }
  }
  const trace = JSON.parse(fs.readFileSync(traceFile, 'utf8')) as { kernel: string; bootMs: number; requests: Req[] };
  const bs = batches(trace.requests);
  const reads = trace.requests.filter((r) => !r[3]);
  console.log(`trace: ${trace.requests.length} requests (${reads.length} reads, ${(reads.reduce((n, r) => n + r[2], 0) / MiB).toFixed(1)} MiB read) in ${bs.length} batches; ` +
    `recorded booting ${path.basename(image)} on ${trace.kernel} under TCG (${(trace.bootMs / 1000).toFixed(1)} s to ready)`);

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'strata-bench-coldstart-'));
  const storeDir = path.join(dir, 'store');
  try {
    // The template, imported once; its profile recorded by one replay (as a first boot would).
    let e = await Engine.open({ store: storeDir, cacheDir: path.join(dir, 'import'), profiles: false });
    const layer = (await e.importImage(image, { codec: CODEC, seedCache: false })).id;
    const h = await e.inspect(layer);
    await e.close();
    console.log(`template: ${(h.virtualSize / MiB).toFixed(0)} MiB, ${h.frames.length} frames (${(h.dataSize / MiB).toFixed(0)} MiB of data, ${codecName(CODEC)})`);
    e = await Engine.open({ store: storeDir, cacheDir: path.join(dir, 'record'), profiles: { windowMs: 3_600_000 } });
    const rec = await e.openDevice(layer);
    await replay(rec, bs);
    await e.closeDevice(rec);
    await e.close();
    const profileBytes = fs.statSync(path.join(storeDir, 'layers', layer, 'profile')).size;

    const cells = new Map<string, Cell>();
    const add = (k: string, r: CellResult) => {
      const c = cells.get(k) ?? { ms: [], frames: [], bytes: [] };
      c.ms.push(r.ms); c.frames.push(r.frames); c.bytes.push(r.bytes);
      cells.set(k, c);
    };
    let n = 0;
    const fresh = () => path.join(dir, `c${n++}`);
    const run = (spec: CellSpec) => runCell({ ...spec, storeDir, layer, traceFile, mibps: MIBPS });
    for (let round = 0; round < ROUNDS; round++) {
      // (a) warm (the first replay warms the cache), then (d) the same cache after a restart
      const warmDir = fresh();
      for (const [mode, pace] of MODES) add(`a warm cache${mode}`, run({ cacheDir: warmDir, warmFirst: true, pace, latencyMs: 0, readahead: 0, profile: false, concurrency: 16 }));
      add(`d warm cache after a restart, ${LATENCIES[0]} ms store`, run({ cacheDir: warmDir, warmFirst: false, pace: 0, latencyMs: LATENCIES[0], readahead: 0, profile: false, concurrency: 16 }));
      for (const [mode, pace] of MODES) {
        for (const lat of LATENCIES) {
          for (const conc of CONCURRENCY) {
            for (const [tag, readahead, profile] of [['b cold, fetch on miss only', 0, false], ['r cold, readahead', 4, false], ['c cold, boot profile + readahead', 4, true]] as const) {
              add(`${tag}, ${lat} ms store${CONCURRENCY.length > 1 ? `, ${conc} fetches at once` : ''}${mode}`,
                run({ cacheDir: fresh(), warmFirst: false, pace, latencyMs: lat, readahead, profile, concurrency: conc }));
            }
          }
        }
      }
      process.stderr.write(`round ${round + 1}/${ROUNDS}\n`);
    }

    const med = (xs: number[]) => [...xs].sort((x, y) => x - y)[xs.length >> 1];
    console.log(`\nreplay time, ${ROUNDS} interleaved rounds; store: first-byte latency as given, ${MIBPS} MiB/s per GET; profile object ${profileBytes} bytes`);
    console.log('| cell | replay ms median | min–max | frames fetched | MiB fetched |');
    console.log('|---|---|---|---|---|');
    for (const [k, c] of cells) {
      console.log(`| ${k} | ${med(c.ms).toFixed(0)} | ${Math.min(...c.ms).toFixed(0)}–${Math.max(...c.ms).toFixed(0)} | ${med(c.frames)} | ${(med(c.bytes) / MiB).toFixed(1)} |`);
    }
    console.log('');
    for (const [mode] of MODES) {
      const a = med(cells.get(`a warm cache${mode}`)!.ms);
      for (const lat of LATENCIES) {
        for (const conc of CONCURRENCY) {
          const sfx = `, ${lat} ms store${CONCURRENCY.length > 1 ? `, ${conc} fetches at once` : ''}${mode}`;
          const b = med(cells.get(`b cold, fetch on miss only${sfx}`)!.ms), c = med(cells.get(`c cold, boot profile + readahead${sfx}`)!.ms);
          console.log(`${sfx.slice(2)}: c/a = ${(c / a).toFixed(2)} (target <= 1.5), b/c = ${(b / c).toFixed(1)} (target >= 4)`);
        }
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
})().catch((err) => { console.error(err); process.exit(1); });
