// How much a set of layers would shrink with block deduplication at several
// block sizes (shared/seeds/003 measured this before dedup was built). Every
// layer's device content is read once; non-zero pieces of each size are
// fingerprinted with SHA-256 (a collision would need a cryptographic break)
// and counted once per distinct content across all the layers.
import { createHash } from 'crypto';
import type { Engine } from './engine';
import type { Progress } from './layer-writer';

export const DEDUP_SIZES = [4096, 16384, 65536, 131072];

export interface DedupRow { blockSize: number; dataBytes: number; uniqueBytes: number; ratio: number; savedPercent: number }
export interface DedupReport { layers: string[]; logicalBytes: number; zeroBytes: number; rows: DedupRow[] }

const CHUNK = 4 * 1024 * 1024;

export async function dedupReport(engine: Engine, layers: string[], onProgress?: (p: Progress) => void): Promise<DedupReport> {
  const seen = DEDUP_SIZES.map(() => new Map<string, number>());
  const data = DEDUP_SIZES.map(() => 0);
  let logical = 0, zero4k = 0;
  const sizes = await Promise.all(layers.map(async (id) => (await engine.inspect(id)).virtualSize));
  const total = sizes.reduce((a, b) => a + b, 0);
  const zero = Buffer.alloc(DEDUP_SIZES[DEDUP_SIZES.length - 1]);
  for (const id of layers) {
    const dev = await engine.openDevice(id);
    try {
      for (let off = 0; off < dev.size; off += CHUNK) {
        const len = Math.min(CHUNK, dev.size - off);
        const buf = await dev.read(off, len);
        logical += len;
        DEDUP_SIZES.forEach((bs, k) => {
          for (let p = 0; p < len; p += bs) {
            const piece = buf.subarray(p, Math.min(len, p + bs));
            if (piece.equals(zero.subarray(0, piece.length))) { if (k === 0) zero4k += piece.length; continue; }
            data[k] += piece.length;
            const key = createHash('sha256').update(piece).digest('base64');
            if (!seen[k].has(key)) seen[k].set(key, piece.length);
          }
        });
        onProgress?.({ phase: 'scan', done: (logical) / 4096, total: total / 4096 });
      }
    } finally { await engine.closeDevice(dev); }
  }
  const rows = DEDUP_SIZES.map((bs, k) => {
    let unique = 0;
    for (const n of seen[k].values()) unique += n;
    return { blockSize: bs, dataBytes: data[k], uniqueBytes: unique, ratio: unique ? data[k] / unique : 1, savedPercent: data[k] ? (100 * (data[k] - unique)) / data[k] : 0 };
  });
  return { layers, logicalBytes: logical, zeroBytes: zero4k, rows };
}

export function formatDedupReport(r: DedupReport): string {
  const mib = (n: number) => `${(n / 1048576).toFixed(1)} MiB`;
  const lines = [
    `${r.layers.length} layer(s), ${mib(r.logicalBytes)} logical, ${mib(r.zeroBytes)} zero (4 KiB blocks; stored as holes at any size)`,
    'block size   non-zero data   unique data   shrink   saved',
  ];
  for (const row of r.rows) {
    lines.push(`${`${row.blockSize / 1024} KiB`.padEnd(12)} ${mib(row.dataBytes).padStart(13)}   ${mib(row.uniqueBytes).padStart(11)}   ${row.ratio.toFixed(2).padStart(5)}×  ${row.savedPercent.toFixed(1).padStart(5)}%`);
  }
  return lines.join('\n');
}
