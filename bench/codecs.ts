// Codec benchmark: compress/decompress throughput and ratio of the frame
// codecs strata could use, on 2 MiB frames built the way the layer writer
// builds them (non-zero 4 KiB blocks packed back to back).
//
//   node -r tsx/cjs bench/codecs.ts                 # frames from /usr files
//   STRATA_BENCH_IMAGE=disk.img node -r tsx/cjs bench/codecs.ts
//
// Knobs: STRATA_BENCH_CODEC_FRAMES (default 32 frames = 64 MiB),
// STRATA_BENCH_CODEC_SECONDS (minimum timed seconds per measurement, default 0.5).
// Everything runs single-threaded on the main thread: the numbers are per core.
import * as fs from 'fs';
import * as path from 'path';

const BS = 4096;
const FRAME = 2 * 1024 * 1024;
const FRAME_BLOCKS = FRAME / BS;

export interface CodecRow {
  codec: string;
  /** Uncompressed MB (1e6 bytes) per second, one thread. */
  compressMBs: number | null;
  decompressMBs: number | null;
  /** Uncompressed bytes / compressed bytes. */
  ratio: number | null;
  note: string;
}

interface Impl {
  name: string;
  compress: ((b: Uint8Array) => Uint8Array) | null;
  /** Decodes frames produced by `decodes` (default: this impl's own compress). */
  decompress: (b: Uint8Array, size: number) => Uint8Array | null;
  decodes?: string;
  note?: string;
}

const log = (m: string) => process.stderr.write(`[codecs] ${m}\n`);
const isZero = (b: Uint8Array) => { for (let i = 0; i < b.length; i++) if (b[i]) return false; return true; };

/**
 * Frames from a raw image: the non-zero blocks, packed into 2 MiB frames.
 * Takes `count` frames spread evenly over the image's data so the sample is
 * not just the first files mkfs laid down.
 */
export function framesFromImage(image: string, count: number): Buffer[] {
  const fd = fs.openSync(image, 'r');
  try {
    const size = fs.fstatSync(fd).size;
    const nonZero: number[] = [];
    const chunk = Buffer.allocUnsafe(4 << 20);
    for (let off = 0; off < size; off += chunk.length) {
      const n = fs.readSync(fd, chunk, 0, Math.min(chunk.length, size - off), off);
      for (let o = 0; o + BS <= n; o += BS) if (!isZero(chunk.subarray(o, o + BS))) nonZero.push((off + o) / BS);
    }
    const avail = Math.floor(nonZero.length / FRAME_BLOCKS);
    const take = Math.max(1, Math.min(count, avail));
    const stride = avail > take ? Math.floor(avail / take) : 1;
    const frames: Buffer[] = [];
    for (let k = 0; k < take; k++) {
      const first = k * stride * FRAME_BLOCKS;
      const blocks = nonZero.slice(first, first + FRAME_BLOCKS);
      const f = Buffer.allocUnsafe(blocks.length * BS);
      blocks.forEach((b, i) => fs.readSync(fd, f, i * BS, BS, b * BS));
      frames.push(f);
    }
    return frames;
  } finally { fs.closeSync(fd); }
}

/** Without an image: file contents from /usr, each padded to 4 KiB like a filesystem would store them. */
export function framesFromFiles(count: number, roots = ['/usr/lib/x86_64-linux-gnu', '/usr/share']): Buffer[] {
  const want = count * FRAME;
  const per = Math.ceil(want / roots.length);
  const parts: Buffer[] = [];
  for (const root of roots) {
    let got = 0;
    const stack = [root];
    while (stack.length && got < per) {
      const dir = stack.pop()!;
      let ents: fs.Dirent[];
      try { ents = fs.readdirSync(dir, { withFileTypes: true }); } catch { continue; }
      ents.sort((a, b) => (a.name < b.name ? -1 : 1));
      for (const e of ents) {
        const p = path.join(dir, e.name);
        if (e.isDirectory()) stack.push(p);
        else if (e.isFile() && got < per) {
          let b: Buffer;
          try { b = fs.readFileSync(p); } catch { continue; }
          if (b.length === 0) continue;
          const padded = Buffer.alloc(Math.ceil(b.length / BS) * BS);
          b.copy(padded);
          parts.push(padded);
          got += padded.length;
        }
      }
    }
  }
  const all = Buffer.concat(parts);
  const frames: Buffer[] = [];
  let cur: Buffer[] = [];
  for (let o = 0; o + BS <= all.length && frames.length < count; o += BS) {
    const blk = all.subarray(o, o + BS);
    if (isZero(blk)) continue;
    cur.push(blk);
    if (cur.length === FRAME_BLOCKS) { frames.push(Buffer.concat(cur)); cur = []; }
  }
  if (frames.length === 0 && cur.length) frames.push(Buffer.concat(cur));
  return frames;
}

function loadZstdCodec(): Promise<any> {
  return new Promise((resolve) => require('zstd-codec').ZstdCodec.run((z: any) => resolve(z)));
}

/** True when a zstd frame header declares its content size (Frame_Content_Size_flag or single-segment). */
function zstdHasContentSize(b: Uint8Array): boolean {
  const fhd = b[4];
  return (fhd >> 6) !== 0 || (fhd & 0x20) !== 0;
}

/** Repeats fn over all frames until at least `minSec` have passed; returns uncompressed MB/s. */
function timeFrames(frames: Uint8Array[], uBytes: number, minSec: number, fn: (f: Uint8Array, i: number) => void): number {
  fn(frames[0], 0); // warm-up (JIT, lazy init)
  let passes = 0;
  const t0 = performance.now();
  let el = 0;
  do {
    frames.forEach(fn);
    passes++;
    el = (performance.now() - t0) / 1000;
  } while (el < minSec);
  return (uBytes * passes) / 1e6 / el;
}

export async function codecBench(frames: Buffer[], opts: { minSeconds?: number } = {}): Promise<CodecRow[]> {
  const minSec = opts.minSeconds ?? Number(process.env.STRATA_BENCH_CODEC_SECONDS ?? 0.5);
  const uBytes = frames.reduce((a, f) => a + f.length, 0);
  const napi: typeof import('zstd-napi') = require('zstd-napi');
  const lz4: { compress(b: Uint8Array): Uint8Array; decompress(b: Uint8Array): Uint8Array } = require('lz4-wasm-nodejs');
  const zc = await loadZstdCodec();
  const simple = new zc.Simple();
  const streaming = new zc.Streaming();

  const impls: Impl[] = [
    { name: 'zstd-napi level 1', compress: (b) => napi.compress(b, { compressionLevel: 1 }), decompress: (b) => napi.decompress(b) },
    { name: 'zstd-napi level 3', compress: (b) => napi.compress(b, { compressionLevel: 3 }), decompress: (b) => napi.decompress(b) },
    { name: 'zstd-codec level 1 (Streaming)', compress: (b) => streaming.compress(b, 1), decompress: (b, n) => streaming.decompress(b, n) },
    { name: 'zstd-codec level 3 (Streaming)', compress: (b) => streaming.compress(b, 3), decompress: (b, n) => streaming.decompress(b, n) },
    { name: 'zstd-codec level 3 (Simple)', compress: (b) => simple.compress(b, 3), decompress: (b) => simple.decompress(b) },
    { name: 'zstd-codec Streaming decoding zstd-napi L3 frames', compress: null, decompress: (b, n) => streaming.decompress(b, n), decodes: 'zstd-napi level 3',
      note: 'the engine\'s fallback decoder path' },
    { name: 'zstd-codec Simple decoding zstd-napi L3 frames', compress: null, decompress: (b) => simple.decompress(b), decodes: 'zstd-napi level 3' },
    { name: 'lz4-wasm-nodejs', compress: (b) => lz4.compress(b), decompress: (b) => lz4.decompress(b) },
  ];

  const outputs = new Map<string, Uint8Array[]>();
  const rows: CodecRow[] = [];
  for (const im of impls) {
    log(`${im.name} ...`);
    const notes: string[] = im.note ? [im.note] : [];
    let cMBs: number | null = null, ratio: number | null = null, dMBs: number | null = null;
    let comp: Uint8Array[] | undefined;
    try {
      if (im.compress) {
        const out: Uint8Array[] = new Array(frames.length);
        cMBs = timeFrames(frames, uBytes, minSec, (f, i) => {
          const c = im.compress!(f);
          if (!c) throw new Error('compress returned null');
          out[i] = c;
        });
        comp = out;
        outputs.set(im.name, out);
        ratio = uBytes / out.reduce((a, c) => a + c.length, 0);
        if (im.name.startsWith('zstd')) notes.push(zstdHasContentSize(out[0]) ? 'frames carry content size' : 'frames lack content size');
      } else comp = outputs.get(im.decodes!);
      if (!comp) throw new Error(`no frames from ${im.decodes}`);
      // Correctness first (one pass, untimed), then the timed passes.
      for (let i = 0; i < frames.length; i++) {
        const d = im.decompress(comp[i], frames[i].length);
        if (!d) throw new Error(`decompress returned null on frame ${i}`);
        if (Buffer.compare(Buffer.from(d.buffer, d.byteOffset, d.length), frames[i]) !== 0) throw new Error(`frame ${i} does not round-trip`);
      }
      dMBs = timeFrames(comp, uBytes, minSec, (c, i) => { im.decompress(c, frames[i].length); });
    } catch (e) {
      notes.push(`FAILS: ${(e as Error).message}`);
    }
    rows.push({ codec: im.name, compressMBs: cMBs, decompressMBs: dMBs, ratio, note: notes.join('; ') });
  }
  return rows;
}

export function formatCodecTable(rows: CodecRow[], frames: number, bytes: number): string {
  const f = (x: number | null, d = 0) => (x === null ? '—' : x.toFixed(d));
  const lines = [
    `Codecs on ${frames} frames of up to 2 MiB (${(bytes / 1048576).toFixed(0)} MiB), one thread, MB = 10^6 bytes of uncompressed data:`,
    '',
    '| codec | compress MB/s | decompress MB/s | ratio | notes |',
    '|---|---:|---:|---:|---|',
    ...rows.map((r) => `| ${r.codec} | ${f(r.compressMBs)} | ${f(r.decompressMBs)} | ${f(r.ratio, 2)} | ${r.note} |`),
  ];
  return lines.join('\n');
}

async function main(): Promise<void> {
  const count = Number(process.env.STRATA_BENCH_CODEC_FRAMES ?? 32);
  const image = process.env.STRATA_BENCH_IMAGE;
  log(image ? `building ${count} frames from ${image}` : `building ${count} frames from /usr files (set STRATA_BENCH_IMAGE to use an image)`);
  const frames = image ? framesFromImage(image, count) : framesFromFiles(count);
  const bytes = frames.reduce((a, b) => a + b.length, 0);
  const rows = await codecBench(frames);
  process.stdout.write(formatCodecTable(rows, frames.length, bytes) + '\n');
}

if (require.main === module) {
  main().catch((e) => { console.error(e); process.exit(1); });
}
