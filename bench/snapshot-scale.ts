// Does a snapshot cost what changed, or what is under it? Snapshots of a
// 64 KiB and a 64 MiB change over templates of 1, 8 and 32 GiB (sparse
// images: 1 MiB of random data every 8 MiB, so the 32 GiB template stores
// 4 GiB in ~1M blocks and its dedup index is ~32 MiB): snapshot time and the
// peak RSS the snapshot adds. Each cell runs in its own process on a warm
// host (the template's index directory, or its local copy, already fetched
// by a first snapshot); rounds interleave the cells.
//   node -r tsx/cjs bench/snapshot-scale.ts [--sizes 1,8,32] [--rounds 3]
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';
import { randomBytes } from 'crypto';
import { Engine, Codec } from '../src/index';

const argv = process.argv.slice(2);
const opt = (name: string, def: string) => { const i = argv.indexOf(name); return i >= 0 && argv[i + 1] ? argv[i + 1] : def; };
const SIZES = opt('--sizes', '1,8,32').split(',').map(Number);
const ROUNDS = Number(opt('--rounds', '3'));
const CHANGES = [64 << 10, 64 << 20];
const MiB = 1 << 20, GiB = 1 << 30;

interface CellSpec { store: string; cacheDir: string; layer: string; change: number }
interface CellResult { ms: number; rssMiB: number; peakAddedMiB: number; dedupBlocks: number; storedBlocks: number }

async function cell(spec: CellSpec): Promise<void> {
  const e = await Engine.open({ store: spec.store, cacheDir: spec.cacheDir, profiles: false });
  try {
    const d = await e.openDevice(spec.layer);
    const piece = 64 << 10;
    for (let done = 0; done < spec.change; done += piece) {
      const at = Math.floor(Math.random() * (d.size / piece)) * piece;
      await d.write(at, randomBytes(piece));
    }
    global.gc?.();
    const rss = process.memoryUsage().rss;
    const t0 = performance.now();
    const s = await d.snapshot();
    const ms = performance.now() - t0;
    const peak = process.resourceUsage().maxRSS * 1024;
    const r: CellResult = { ms, rssMiB: rss / MiB, peakAddedMiB: Math.max(0, peak - rss) / MiB, dedupBlocks: s.stats.dedupBlocks, storedBlocks: s.stats.storedBlocks };
    process.stdout.write(`${JSON.stringify(r)}\n`);
  } finally { await e.close(); }
}

function runCell(spec: CellSpec): CellResult {
  const r = spawnSync(process.execPath, ['--expose-gc', '-r', 'tsx/cjs', __filename, '--cell', JSON.stringify(spec)], { encoding: 'utf8', maxBuffer: 1 << 24 });
  const line = r.stdout.split('\n').find((l) => l.startsWith('{'));
  if (r.status !== 0 || !line) throw new Error(`cell failed (exit ${r.status}): ${r.stderr.slice(-1500)}`);
  return JSON.parse(line) as CellResult;
}

/** A sparse image: 1 MiB of random bytes every 8 MiB. */
function makeImage(file: string, size: number): void {
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, size);
    for (let at = 0; at < size; at += 8 * MiB) fs.writeSync(fd, randomBytes(MiB), 0, MiB, at);
  } finally { fs.closeSync(fd); }
}

(async () => {
  if (argv[0] === '--cell') return cell(JSON.parse(argv[1]));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'strata-bench-snapscale-'));
  try {
    const templates: Array<{ gib: number; layer: string; cacheDir: string; indexBytes: number }> = [];
    const store = path.join(dir, 'store');
    for (const gib of SIZES) {
      const img = path.join(dir, `img${gib}`);
      makeImage(img, gib * GiB);
      const t0 = Date.now();
      const e = await Engine.open({ store, cacheDir: path.join(dir, `import${gib}`), profiles: false });
      const r = await e.importImage(img, { codec: Codec.Lz4, seedCache: false });
      await e.close();
      fs.rmSync(img);
      fs.rmSync(path.join(dir, `import${gib}`), { recursive: true, force: true });
      const indexBytes = fs.statSync(path.join(store, 'layers', r.id, 'index')).size;
      process.stderr.write(`template ${gib} GiB: ${r.stats.storedBlocks} blocks stored, index ${(indexBytes / MiB).toFixed(1)} MiB, imported in ${((Date.now() - t0) / 1000).toFixed(0)} s\n`);
      const t = { gib, layer: r.id, cacheDir: path.join(dir, `host${gib}`), indexBytes };
      // Warm the host: a first snapshot of each size of change fetches what later ones reuse.
      for (const change of CHANGES) runCell({ store, cacheDir: t.cacheDir, layer: t.layer, change });
      templates.push(t);
    }
    const res = new Map<string, CellResult[]>();
    for (let round = 0; round < ROUNDS; round++) {
      for (const change of CHANGES) {
        for (const t of templates) {
          const k = `${t.gib}:${change}`;
          res.set(k, [...(res.get(k) ?? []), runCell({ store, cacheDir: t.cacheDir, layer: t.layer, change })]);
        }
      }
      process.stderr.write(`round ${round + 1}/${ROUNDS}\n`);
    }
    const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1];
    console.log(`snapshot of a change over templates of ${SIZES.join(', ')} GiB; ${ROUNDS} interleaved rounds, each cell its own process, warm host`);
    console.log('| change | template | template index | snapshot ms median | min–max | peak RSS added (MiB) median | vs smallest template |');
    console.log('|---|---|---|---|---|---|---|');
    for (const change of CHANGES) {
      const base = med(res.get(`${templates[0].gib}:${change}`)!.map((r) => r.ms));
      for (const t of templates) {
        const xs = res.get(`${t.gib}:${change}`)!;
        const ms = xs.map((r) => r.ms);
        console.log(`| ${change >= MiB ? `${change / MiB} MiB` : `${change >> 10} KiB`} | ${t.gib} GiB | ${(t.indexBytes / MiB).toFixed(1)} MiB | ${med(ms).toFixed(0)} | ${Math.min(...ms).toFixed(0)}–${Math.max(...ms).toFixed(0)} | ` +
          `${med(xs.map((r) => r.peakAddedMiB)).toFixed(0)} | ${(med(ms) / base).toFixed(2)} |`);
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
})().catch((err) => { console.error(err); process.exit(1); });
