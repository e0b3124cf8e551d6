// strata engine benchmark: `npm run bench:engine`.
//
// Prints one markdown table (stdout) comparing strata's in-process device,
// import and snapshot paths with raw io_uring on plain page-cache files, then
// the codec table (bench/codecs.ts); progress goes to stderr. It is a
// benchmark, not a test: nothing passes or fails. See bench/README.md for what
// each row means. Rows measured while other processes kept the CPUs busy are
// flagged with ⚠, and anything that looked wrong (a sampled block reading back
// wrong, io_uring completions left unreaped) is listed under "Surprises".
//
// Knobs (environment):
//   STRATA_BENCH_SIZE_MB      image / device / baseline file size (default 1024)
//   STRATA_BENCH_CONTENT_MB   file content copied into the ext4 image (default min(400, 40% of size))
//   STRATA_BENCH_SECONDS      seconds per timed I/O test (default 3)
//   STRATA_BENCH_SNAPSHOT_MB  dirty data written before the snapshot (default 1024, at most the size)
//   STRATA_BENCH_COLD_OPS     4 KiB reads in each cold test (default 16384)
//   STRATA_BENCH_CODEC_FRAMES 2 MiB frames for the codec table (default 32; 0 skips it)
//   STRATA_BENCH_NO_NATIVE=1  skip the raw native-loop baseline rows
//   STRATA_BENCH_SYNC=0       do not `sync` dirty pages between phases
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { execFileSync } from 'child_process';
import { randomFillSync } from 'crypto';
import { Engine } from '../src/engine';
import type { Device } from '../src/device';
import { Uring } from '../src/uring';
import { CQ_ENTRY, FLAG_FIXED, loadNative, OP, SQ_ENTRY, writeDesc, type Desc } from '../src/native';
import { BLOCK_SIZE, Codec, ZERO_LAYER, type LayerHeader } from '../src/format';
import { codecBench, formatCodecTable, framesFromImage } from './codecs';

const BS = BLOCK_SIZE;
const KiB = 1024, MiB = 1024 * 1024;
const num = (k: string, d: number) => { const v = process.env[k]; return v === undefined || v === '' ? d : Number(v); };
const SIZE = Math.max(64, num('STRATA_BENCH_SIZE_MB', 1024)) * MiB;
const CONTENT = num('STRATA_BENCH_CONTENT_MB', Math.min(400, Math.floor((SIZE / MiB) * 0.4))) * MiB;
const SECONDS = num('STRATA_BENCH_SECONDS', 3);
const WARMUP = Math.min(0.5, SECONDS / 4);
const SNAP = Math.min(num('STRATA_BENCH_SNAPSHOT_MB', 1024) * MiB, SIZE);
const COLD_OPS = num('STRATA_BENCH_COLD_OPS', 16384);
const CODEC_FRAMES = num('STRATA_BENCH_CODEC_FRAMES', 32);
const NATIVE_ROWS = process.env.STRATA_BENCH_NO_NATIVE !== '1';
const SYNC = process.env.STRATA_BENCH_SYNC !== '0';

const T0 = performance.now();
const LOAD0 = os.loadavg()[0];
let lastStep = '';
const log = (m: string) => {
  if (!m.startsWith('=>') && !m.startsWith('SURPRISE')) lastStep = m;
  process.stderr.write(`[bench ${((performance.now() - T0) / 1000).toFixed(1).padStart(5)}s] ${m}\n`);
};

// ------------------------------------------------------------ measurement

interface Measure { ops: number; bytes: number; seconds: number; iops: number; mbs: number; p50: number; p99: number; otherCpu?: number }

/**
 * CPU the rest of the machine used while a test ran, in CPUs (0..ncpu): all
 * busy time in /proc/stat minus this process's own (all its threads, which
 * includes its io_uring workers). Kernel writeback threads count as "other".
 * The machine may be shared; rows run under contention are flagged.
 */
function cpuMeter(): () => number {
  const busy = () => {
    try {
      const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
      return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / 100; // user nice system irq softirq steal, seconds (USER_HZ 100)
    } catch { return NaN; }
  };
  const b0 = busy(), c0 = process.cpuUsage(), t0 = performance.now();
  return () => {
    const c = process.cpuUsage(c0);
    const own = (c.user + c.system) / 1e6;
    const sec = (performance.now() - t0) / 1000;
    return Math.max(0, (busy() - b0 - own) / sec);
  };
}

class Latencies {
  private a = new Float64Array(1 << 16);
  n = 0;
  push(v: number): void {
    if (this.n === this.a.length) { const b = new Float64Array(this.a.length * 2); b.set(this.a); this.a = b; }
    this.a[this.n++] = v;
  }
  /** Percentile in µs (values are recorded in ms). */
  pct(p: number): number {
    if (this.n === 0) return NaN;
    const s = this.a.subarray(0, this.n).sort();
    return s[Math.min(this.n - 1, Math.floor((p / 100) * this.n))] * 1000;
  }
}

function summarize(ops: number, bytes: number, seconds: number, lat: Latencies): Measure {
  return { ops, bytes, seconds, iops: ops / seconds, mbs: bytes / 1e6 / seconds, p50: lat.pct(50), p99: lat.pct(99) };
}

/**
 * Closed loop: `qd` workers, each with one request outstanding at a time, until
 * the deadline or `maxOps` requests. Latency is per request, issue to resolve.
 */
async function closedLoop(qd: number, seconds: number, bytesPerOp: number, op: (slot: number) => Promise<unknown>,
  maxOps = Infinity): Promise<Measure> {
  const lat = new Latencies();
  let issued = 0, done = 0;
  const other = cpuMeter();
  const t0 = performance.now();
  const deadline = t0 + seconds * 1000;
  const worker = async (slot: number) => {
    for (;;) {
      const s = performance.now();
      if (s >= deadline || issued >= maxOps) return;
      issued++;
      await op(slot);
      lat.push(performance.now() - s);
      done++;
    }
  };
  await Promise.all(Array.from({ length: qd }, (_, i) => worker(i)));
  return { ...summarize(done, done * bytesPerOp, (performance.now() - t0) / 1000, lat), otherCpu: other() };
}

/** Runs a short unmeasured warm-up (JIT, caches), then the measured loop. */
async function timed(qd: number, bytesPerOp: number, op: (slot: number) => Promise<unknown>): Promise<Measure> {
  if (WARMUP > 0) await closedLoop(qd, WARMUP, bytesPerOp, op);
  return closedLoop(qd, SECONDS, bytesPerOp, op);
}

const randBlock = (blocks: number) => Math.floor(Math.random() * blocks);
/** Offsets of a sequential stream of `len`-byte requests over [0, size), wrapping. */
function seqCursor(size: number, len: number): () => number {
  let next = 0;
  return () => { const o = next; next += len; if (next + len > size) next = 0; return o; };
}

// ------------------------------------------------------------ stall watchdog

/**
 * Completions that sit in a ring's CQ while nobody reaps them (a lost eventfd
 * wake-up) would hang a closed-loop benchmark forever: every worker waits and
 * nothing else submits. Once a second, compare each io_uring fd's CQ head and
 * tail (/proc/self/fdinfo); if CQEs stay unreaped for STALL_S seconds, record
 * it and submit one cheap op (fdatasync) on every ring we know, whose
 * completion wakes the loop and reaps the stuck ones too.
 */
const STALL_S = 3;
/** Batches src/uring.ts's last-resort watchdog delivered because no eventfd wake-up did (should stay 0). */
const watchdogReaps = { baseline: 0, engines: 0 };
const kickers: Array<{ name: string; ring: () => Uring | null; fd: number }> = [];
function startWatchdog(): () => void {
  const seen = new Map<string, { head: number; still: number }>();
  const iv = setInterval(() => {
    let fds: string[];
    try { fds = fs.readdirSync('/proc/self/fd'); } catch { return; }
    for (const f of fds) {
      let link = '';
      try { link = fs.readlinkSync(`/proc/self/fd/${f}`); } catch { continue; }
      if (link !== 'anon_inode:[io_uring]') continue;
      let info = '';
      try { info = fs.readFileSync(`/proc/self/fdinfo/${f}`, 'utf8'); } catch { continue; }
      // Only strata's rings (they register the I/O region); libuv keeps rings
      // of its own whose CQEs it reaps on its own schedule.
      if (!/UserBufs:\s*[1-9]/.test(info)) continue;
      const head = Number(/CqHead:\s*(\d+)/.exec(info)?.[1]), tail = Number(/CqTail:\s*(\d+)/.exec(info)?.[1]);
      const st = seen.get(f) ?? { head: -1, still: 0 };
      st.still = tail > head && head === st.head ? st.still + 1 : 0;
      st.head = head;
      seen.set(f, st);
      if (st.still === STALL_S) {
        const rings = kickers.map((k) => ({ k, r: k.ring() })).filter((x) => x.r)
          .map(({ k, r }) => `${k.name}: ${r!.inflight} in flight, ${r!.stats.completed}/${r!.stats.submitted} completed`).join('; ');
        surprise(`io_uring fd ${f}: ${tail - head} completions left unreaped for ${STALL_S} s (CqHead ${head}, CqTail ${tail}) during "${lastStep}" ` +
          `[${rings}]; kicked every ring with one fdatasync`);
        for (const { ring, fd } of kickers) ring()?.fsync(fd).catch(() => {});
      }
    }
  }, 1000);
  iv.unref();
  return () => clearInterval(iv);
}

// ------------------------------------------------------------ the table

interface Row { test: string; m?: Partial<Measure>; vs?: number | string; notes?: string; sec?: number }
const rows: Row[] = [];
let curSection = 0;
/** Things that looked wrong while benchmarking (printed after the table). */
const surprises: string[] = [];
const surprise = (m: string) => { surprises.push(m); log(`SURPRISE: ${m}`); };
const fmt = (x: number | undefined, d = 0) => (x === undefined || !Number.isFinite(x) ? '' : x >= 100000 ? Math.round(x).toLocaleString('en-US') : x.toFixed(d));
const fmtVs = (v: number | string | undefined) => (v === undefined ? '' : typeof v === 'string' ? v : `${v.toFixed(2)}x`);

const CONTENDED = 0.25;
function addRow(r: Row): void {
  r.sec ??= curSection;
  const oc = r.m?.otherCpu;
  if (oc !== undefined && oc > CONTENDED) r.notes = `${r.notes ? r.notes + '; ' : ''}⚠ other processes used ${oc.toFixed(1)} CPU`;
  rows.push(r);
  const m = r.m ?? {};
  log(`=> ${r.test}: ${m.iops ? `${fmt(m.iops)} IOPS ` : ''}${m.mbs ? `${fmt(m.mbs, 1)} MB/s ` : ''}${m.p50 ? `p50 ${fmt(m.p50)}µs p99 ${fmt(m.p99)}µs ` : ''}${fmtVs(r.vs)} ${r.notes ?? ''}`);
}

function table(): string {
  const head = '| test | IOPS | MB/s | p50 µs | p99 µs | vs baseline | notes |';
  const lines = [head, '|---|---:|---:|---:|---:|---:|---|'];
  // Sections run in dependency order (import before devices) but print by number.
  const sorted = rows.map((r, i) => ({ r, i })).sort((a, b) => (a.r.sec! - b.r.sec!) || (a.i - b.i)).map((x) => x.r);
  for (const r of sorted) {
    if (!r.m && r.vs === undefined && !r.notes) { lines.push(`| **${r.test}** | | | | | | |`); continue; }
    const m = r.m ?? {};
    lines.push(`| ${r.test} | ${fmt(m.iops)} | ${fmt(m.mbs, 1)} | ${fmt(m.p50)} | ${fmt(m.p99)} | ${fmtVs(r.vs)} | ${r.notes ?? ''} |`);
  }
  return lines.join('\n');
}
function section(n: number, title: string): void { curSection = n; rows.push({ test: `${n}. ${title}`, sec: n }); }

// ------------------------------------------------------------ helpers

function syncDisks(): void {
  if (!SYNC) return;
  const t = performance.now();
  try { execFileSync('sync', { stdio: 'ignore' }); } catch { /* best effort */ }
  const ms = performance.now() - t;
  if (ms > 500) log(`sync took ${(ms / 1000).toFixed(1)} s`);
}

function writeAllSync(fd: number, b: Uint8Array, pos: number): void {
  let done = 0;
  while (done < b.length) done += fs.writeSync(fd, b, done, b.length - done, pos + done);
}

/** A file of `size` random-ish bytes written sequentially in `writeSize` pieces (this decides its page-cache folio sizes). */
function fillFile(file: string, size: number, writeSize: number): void {
  const fd = fs.openSync(file, 'w');
  const chunk = Buffer.allocUnsafe(4 * MiB);
  randomFillSync(chunk);
  try {
    for (let off = 0; off < size; off += writeSize) {
      const len = Math.min(writeSize, size - off);
      const at = off % chunk.length;
      writeAllSync(fd, chunk.subarray(at, at + len), off);
    }
  } finally { fs.closeSync(fd); }
}

function walkFiles(root: string, budget: number, out: Array<{ src: string; size: number }>): number {
  let got = 0;
  const stack = [root];
  while (stack.length && got < budget) {
    const dir = stack.pop()!;
    let ents: fs.Dirent[];
    try { ents = fs.readdirSync(dir, { withFileTypes: true }); } catch { continue; }
    ents.sort((a, b) => (a.name < b.name ? 1 : -1)); // popped in name order
    for (const e of ents) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) stack.push(p);
      else if (e.isFile()) {
        let size: number;
        try { size = fs.statSync(p).size; } catch { continue; }
        if (size === 0 || got + size > budget) continue;
        out.push({ src: p, size });
        got += size;
      }
    }
  }
  return got;
}

/**
 * A realistic image: an ext4 filesystem of `size` bytes holding copies of
 * /usr/lib/x86_64-linux-gnu and /usr/share files (about `content` bytes).
 * Falls back to synthetic mixed data when mkfs.ext4 is missing.
 */
function makeImage(work: string, size: number, content: number): { file: string; kind: string } {
  const img = path.join(work, 'image.raw');
  const src = path.join(work, 'src');
  let mkfs: string | null = null;
  for (const c of ['/usr/sbin/mkfs.ext4', '/sbin/mkfs.ext4']) if (fs.existsSync(c)) { mkfs = c; break; }
  if (mkfs) {
    const files: Array<{ src: string; size: number }> = [];
    let got = 0;
    const roots = ['/usr/lib/x86_64-linux-gnu', '/usr/share'].filter((r) => fs.existsSync(r));
    for (const r of roots) got += walkFiles(r, content / roots.length, files);
    log(`copying ${files.length} files (${(got / MiB).toFixed(0)} MiB) into ${src}`);
    for (const f of files) {
      const dest = path.join(src, f.src);
      fs.mkdirSync(path.dirname(dest), { recursive: true });
      try { fs.copyFileSync(f.src, dest); } catch { /* unreadable: skip */ }
    }
    fs.closeSync(fs.openSync(img, 'w'));
    fs.truncateSync(img, size);
    log(`mkfs.ext4 -d (${size / MiB} MiB image)`);
    try {
      execFileSync(mkfs, ['-q', '-F', '-b', '4096', '-d', src, img], { stdio: ['ignore', 'ignore', 'pipe'] });
      fs.rmSync(src, { recursive: true, force: true });
      return { file: img, kind: `ext4 with ${(got / MiB).toFixed(0)} MiB of /usr files` };
    } catch (e) {
      log(`mkfs.ext4 failed (${(e as Error).message.split('\n')[0]}); using synthetic data`);
      fs.rmSync(src, { recursive: true, force: true });
    }
  }
  // Synthetic fallback: 60% zero, 10% repeats, 30% compressible runs.
  const fd = fs.openSync(img, 'w');
  const chunk = Buffer.alloc(MiB);
  const prev = Buffer.alloc(BS);
  let seed = 12345;
  const rnd = () => { seed = (Math.imul(seed, 1103515245) + 12345) >>> 0; return seed / 4294967296; };
  for (let off = 0; off < size; off += MiB) {
    chunk.fill(0);
    for (let o = 0; o < MiB; o += BS) {
      const k = rnd();
      if (k < 0.6) continue;
      if (k < 0.7) { prev.copy(chunk, o); continue; }
      for (let x = 0; x < BS; x += 32) chunk.fill(Math.floor(rnd() * 64) + 32, o + x, o + x + 32);
      chunk.copy(prev, 0, o, o + BS);
    }
    writeAllSync(fd, chunk, off);
  }
  fs.closeSync(fd);
  return { file: img, kind: 'synthetic mixed data (mkfs.ext4 unavailable)' };
}

/** Device blocks a header maps to stored data (not zero extents). */
function dataBlocks(h: LayerHeader): Uint32Array {
  let n = 0;
  for (const e of h.extents) if (e.layer !== ZERO_LAYER) n += e.len / BS;
  const out = new Uint32Array(n);
  let i = 0;
  for (const e of h.extents) if (e.layer !== ZERO_LAYER) for (let b = e.dev / BS; b < (e.dev + e.len) / BS; b++) out[i++] = b;
  return out;
}

/** Start offsets of the `len`-byte chunks that map at least some stored data, in device order. */
function dataChunks(h: LayerHeader, len: number): number[] {
  const out: number[] = [];
  for (const e of h.extents) {
    if (e.layer === ZERO_LAYER) continue;
    for (let c = Math.floor(e.dev / len) * len; c < e.dev + e.len; c += len) if (out[out.length - 1] !== c) out.push(c);
  }
  return out;
}

// ------------------------------------------------------------ baselines

/** Memory the baselines' buffers live in: a shared WebAssembly.Memory, like the engine's heap. */
function sharedRegion(bytes: number) {
  const offset = 65536;
  const pages = Math.ceil((offset + bytes) / 65536);
  const memory = new WebAssembly.Memory({ initial: pages, maximum: pages, shared: true });
  const u8 = new Uint8Array(memory.buffer);
  randomFillSync(u8.subarray(offset, offset + bytes));
  return { memory, offset, length: bytes, u8 };
}

interface Shape { name: string; write: boolean; len: number; qd: number; seq: boolean }
const SHAPES: Shape[] = [
  { name: 'rand read 4K QD32', write: false, len: 4 * KiB, qd: 32, seq: false },
  { name: 'rand write 4K QD32', write: true, len: 4 * KiB, qd: 32, seq: false },
  { name: 'seq read 128K QD8', write: false, len: 128 * KiB, qd: 8, seq: true },
  { name: 'seq write 128K QD8', write: true, len: 128 * KiB, qd: 8, seq: true },
];

/** Through src/uring.ts, the promise API the engine itself uses. */
async function uringShape(ring: Uring, reg: { offset: number }, fd: number, size: number, s: Shape): Promise<Measure> {
  syncDisks();
  const blocks = size / s.len;
  const next = s.seq ? seqCursor(size, s.len) : () => randBlock(blocks) * s.len;
  return timed(s.qd, s.len, (slot) => {
    const ptr = reg.offset + slot * s.len;
    return s.write ? ring.writeFull(fd, next(), s.len, ptr) : ring.readFull(fd, next(), s.len, ptr);
  });
}

/** The addon driven directly: synchronous submit/wait loop, no promises. */
function nativeShape(fd: number, size: number, s: Shape, reg: { memory: WebAssembly.Memory; offset: number; length: number }, seconds: number): Measure {
  syncDisks();
  const native = loadNative();
  const CAP = 256;
  const sqBuf = new SharedArrayBuffer(CAP * SQ_ENTRY), cqBuf = new SharedArrayBuffer(CAP * CQ_ENTRY);
  const sq = new DataView(sqBuf), cq = new DataView(cqBuf);
  const ring = new native.Ring(64, sqBuf, cqBuf);
  ring.addRegion(reg.memory.buffer as unknown as SharedArrayBuffer, reg.offset, reg.length);
  if (ring.registerRegions() !== 0) log('native ring: buffer registration failed, using plain READ/WRITE');
  const blocks = size / s.len;
  const next = s.seq ? seqCursor(size, s.len) : () => randBlock(blocks) * s.len;
  const d: Desc = { op: s.write ? OP.WRITE : OP.READ, flags: FLAG_FIXED, bufIndex: 0, fd, len: s.len, id: 0, bufOffset: 0, fileOffset: 0 };
  const started = new Float64Array(s.qd);
  const lat = new Latencies();
  let head = 0, ops = 0, outstanding = 0;
  const prep = (slot: number, now: number) => {
    d.id = slot; d.bufOffset = slot * s.len; d.fileOffset = next();
    writeDesc(sq, head++, CAP, d);
    started[slot] = now;
    outstanding++;
  };
  try {
    const run = (sec: number, record: boolean) => {
      const t0 = performance.now();
      const deadline = t0 + sec * 1000;
      for (let i = 0; i < s.qd; i++) prep(i, t0);
      ring.submit(head - s.qd, s.qd);
      while (outstanding > 0) {
        const n = ring.wait(1);
        const now = performance.now();
        const from = head;
        for (let i = 0; i < n; i++) {
          const slot = cq.getUint32(i * CQ_ENTRY, true), res = cq.getInt32(i * CQ_ENTRY + 4, true);
          if (res !== s.len) throw new Error(`native ${s.name}: result ${res}`);
          outstanding--;
          if (record) { lat.push(now - started[slot]); ops++; }
          if (now < deadline) prep(slot, now);
        }
        if (head > from) ring.submit(from, head - from);
      }
      return (performance.now() - t0) / 1000;
    };
    if (WARMUP > 0) run(WARMUP, false);
    const other = cpuMeter();
    const el = run(seconds, true);
    return { ...summarize(ops, ops * s.len, el, lat), otherCpu: other() };
  } finally { ring.close(); }
}

/**
 * One pass of writes into a new sparse file: every write is the first touch
 * of its pages, which allocates page cache (and on a VM with free page
 * reporting faults guest memory back in). The reference for the snapshot
 * fill, which writes a new overlay the same way; it runs right before the
 * fill so both see similar memory conditions.
 */
async function sparseBaseline(ring: Uring, reg: { offset: number }, dir: string, label: string, size: number, len: number, qd: number, seq: boolean): Promise<Measure & { remove(): void }> {
  // The file is kept until the device test has run: deleting it first would
  // hand the device test a pool of just-freed (still host-backed) pages.
  const file = path.join(dir, `baseline-sparse-${len}.raw`);
  log(`baseline uring.ts ${label} into a new sparse file`);
  fs.closeSync(fs.openSync(file, 'w'));
  fs.truncateSync(file, size);
  syncDisks();
  const fd = fs.openSync(file, 'r+');
  try {
    const blocks = size / len;
    let next = 0;
    // Sequential: exactly one pass (like the snapshot fill); random: timed.
    const m = seq
      ? await closedLoop(qd, 3600, len, (slot) => { const o = next; next += len; return ring.writeFull(fd, o, len, reg.offset + slot * len); }, blocks)
      : await closedLoop(qd, SECONDS, len, (slot) => ring.writeFull(fd, randBlock(blocks) * len, len, reg.offset + slot * len));
    addRow({ test: `uring.ts ${label}, new sparse file`, m, vs: '1.00 (ref)', notes: 'first touch of every page; measured right before the snapshot fill', sec: 1 });
    return { ...m, remove: () => fs.rmSync(file, { force: true }) };
  } finally { fs.closeSync(fd); }
}

// ------------------------------------------------------------ strata device

async function deviceShape(dev: Device, s: Shape, pick?: () => number): Promise<Measure> {
  syncDisks();
  const bufs = Array.from({ length: s.qd }, () => { const b = Buffer.allocUnsafe(s.len); randomFillSync(b); return b; });
  const blocks = dev.size / s.len;
  const next = pick ?? (s.seq ? seqCursor(dev.size, s.len) : () => randBlock(blocks) * s.len);
  return timed(s.qd, s.len, (slot) => (s.write ? dev.write(next(), bufs[slot]) : dev.readInto(next(), bufs[slot])));
}

/**
 * Mixed dirty data for the snapshot, per 4 KiB block: 15% zero, 25% random
 * (incompressible, unique), 50% real image blocks with a unique stamp
 * (compressible, not deduplicable), 10% exact copies of image blocks (dedup
 * hits against the base layer).
 */
function mixedFiller(pool: Buffer) {
  const poolBlocks = pool.length / BS;
  let seed = 0x9e3779b9;
  const rnd = () => { seed ^= seed << 13; seed >>>= 0; seed ^= seed >>> 17; seed ^= seed << 5; seed >>>= 0; return seed / 4294967296; };
  return (buf: Buffer, firstBlock: number) => {
    for (let o = 0, b = firstBlock; o < buf.length; o += BS, b++) {
      const k = rnd();
      const blk = buf.subarray(o, o + BS);
      if (k < 0.15) blk.fill(0);
      else if (k < 0.40) randomFillSync(blk);
      else {
        const src = Math.floor(rnd() * poolBlocks) * BS;
        pool.copy(blk, 0, src, src + BS);
        if (k < 0.90) { blk.writeUInt32LE(b, 0); blk.writeUInt32LE(0x5354524b, 4); }
      }
    }
  };
}

function readPool(image: string, bytes: number): Buffer {
  const fd = fs.openSync(image, 'r');
  const out = Buffer.alloc(bytes);
  let got = 0;
  const chunk = Buffer.allocUnsafe(MiB);
  try {
    const size = fs.fstatSync(fd).size;
    for (let off = 0; off < size && got < bytes; off += MiB) {
      const n = fs.readSync(fd, chunk, 0, MiB, off);
      for (let o = 0; o + BS <= n && got < bytes; o += BS) {
        const blk = chunk.subarray(o, o + BS);
        if (blk.some((x) => x !== 0)) { blk.copy(out, got); got += BS; }
      }
    }
  } finally { fs.closeSync(fd); }
  if (got === 0) randomFillSync(out);
  return got === 0 || got === bytes ? out : out.subarray(0, got);
}

/** Sanity check (not a test): the device returns what was written at sampled offsets. */
async function checkSamples(dev: Device, samples: Map<number, Buffer>, what: string): Promise<void> {
  let bad = 0;
  for (const [off, want] of samples) if (!(await dev.read(off, want.length)).equals(want)) bad++;
  if (bad) surprise(`${what}: ${bad} of ${samples.size} sampled blocks read back wrong`);
  else log(`check ${what}: ${samples.size} sampled blocks ok`);
}

/** Samples `n` blocks of an image file, for checkSamples. */
function imageSamples(image: string, n: number): Map<number, Buffer> {
  const fd = fs.openSync(image, 'r');
  const out = new Map<number, Buffer>();
  try {
    const blocks = fs.fstatSync(fd).size / BS;
    for (let i = 0; i < n; i++) {
      const b = randBlock(blocks), buf = Buffer.alloc(BS);
      fs.readSync(fd, buf, 0, BS, b * BS);
      out.set(b * BS, buf);
    }
  } finally { fs.closeSync(fd); }
  return out;
}

// ------------------------------------------------------------ main

async function main(): Promise<void> {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'strata-bench-'));
  const engines: Engine[] = [];
  const closers: Array<() => void> = [];
  const cleanup = () => fs.rmSync(work, { recursive: true, force: true });
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => { cleanup(); process.exit(130); });
  const stopWatchdog = startWatchdog();
  try {
    log(`size ${SIZE / MiB} MiB, ${SECONDS} s per I/O test, snapshot ${SNAP / MiB} MiB, ${os.availableParallelism()} CPUs, work dir ${work}`);

    // ---- image
    const img = makeImage(work, SIZE, CONTENT);
    log(`image: ${img.kind}`);
    const runOther = cpuMeter();

    // ---- 1. baselines on plain buffered files with the same page-cache
    // history as the device's files: reads come from a file written 2 MiB at
    // a time (the layer cache is filled a frame at a time), writes go to a new
    // sparse file, random first and then sequential (the overlay's history).
    const readFile = path.join(work, 'baseline-read.raw');
    log(`writing ${SIZE / MiB} MiB baseline file (2 MiB writes)`);
    fillFile(readFile, SIZE, 2 * MiB);
    const base = new Map<string, Measure>();
    const reg = sharedRegion(8 * MiB);
    section(1, `baseline: io_uring on ${SIZE / MiB} MiB page-cache files`);
    const ring = new Uring(reg.memory, { offset: reg.offset, length: reg.length }, 256);
    closers.push(() => { watchdogReaps.baseline += ring.stats.watchdogReaps ?? 0; ring.close(); });
    const kickFd = fs.openSync(img.file, 'r');
    closers.push(() => fs.closeSync(kickFd));
    let baselineOpen = true;
    closers.unshift(() => { baselineOpen = false; });
    kickers.push({ name: 'baseline ring', ring: () => (baselineOpen ? ring : null), fd: kickFd });
    if (!ring.fixed) log('uring.ts: buffer registration failed (non-fixed READ/WRITE)');
    for (const kind of NATIVE_ROWS ? ['uring.ts', 'native loop'] : ['uring.ts']) {
      const rfd = fs.openSync(readFile, 'r');
      const writeFile = path.join(work, 'baseline-write.raw');
      fs.closeSync(fs.openSync(writeFile, 'w'));
      fs.truncateSync(writeFile, SIZE);
      const wfd = fs.openSync(writeFile, 'r+');
      try {
        for (const s of SHAPES) {
          log(`baseline ${kind} ${s.name}`);
          const fd = s.write ? wfd : rfd;
          const m = kind === 'uring.ts' ? await uringShape(ring, reg, fd, SIZE, s) : nativeShape(fd, SIZE, s, reg, SECONDS);
          if (kind === 'uring.ts') base.set(s.name, m);
          addRow({ test: `${kind} ${s.name}`, m, vs: kind === 'uring.ts' ? '1.00 (ref)' : m.iops / base.get(s.name)!.iops,
            notes: kind !== 'uring.ts' || !s.write ? '' : s.seq ? 'same file, after the rand-write test' : 'new sparse file: first touch of most pages' });
        }
      } finally { fs.closeSync(rfd); fs.closeSync(wfd); fs.rmSync(writeFile, { force: true }); }
    }
    {
      log('baseline image seq read 1M QD8');
      const ifd = fs.openSync(img.file, 'r');
      try {
        const cur = seqCursor(SIZE, MiB);
        const m = await timed(8, MiB, (slot) => ring.readFull(ifd, cur(), MiB, reg.offset + slot * MiB));
        base.set('image read', m);
        addRow({ test: 'uring.ts image seq read 1M QD8', m, vs: '1.00 (ref)', notes: 'reference for import' });
      } finally { fs.closeSync(ifd); }
    }
    {
      // The page cache remembers how a file was first written: a file written
      // in big pieces sits in large folios, and a 4 KiB write then dirties
      // (and later writes back) a whole folio.
      log(`baseline uring.ts ${SHAPES[1].name} overwriting the read file`);
      const fd = fs.openSync(readFile, 'r+');
      try {
        const m = await uringShape(ring, reg, fd, SIZE, SHAPES[1]);
        addRow({ test: `uring.ts ${SHAPES[1].name}, overwriting the 2 MiB-written file`, m, vs: m.iops / base.get(SHAPES[1].name)!.iops,
          notes: 'large page-cache folios: each 4K write dirties a whole folio' });
      } finally { fs.closeSync(fd); }
    }
    fs.rmSync(readFile, { force: true });

    // ---- 4. import (zstd, lz4)
    const storeDir = path.join(work, 'store');
    syncDisks();
    section(4, `import of a ${SIZE / MiB} MiB image (${img.kind})`);
    const engA = await Engine.open({ store: storeDir, cacheDir: path.join(work, 'cacheA') });
    engines.push(engA);
    kickers.push({ name: 'engine A ring', ring: () => (engines.includes(engA) ? engA.core.uring : null), fd: kickFd });
    const layers: Record<string, LayerHeader> = {};
    for (const [name, codec] of [['zstd', Codec.Zstd], ['lz4', Codec.Lz4]] as const) {
      log(`importImage ${name}`);
      let lastPhase = '';
      const t = performance.now(), other = cpuMeter();
      const r = await engA.importImage(img.file, {
        codec, onProgress: (p) => { if (p.phase !== lastPhase) { lastPhase = p.phase; log(`  import ${name}: ${p.phase}`); } },
      });
      const sec = (performance.now() - t) / 1000;
      layers[name] = r.header;
      const st = r.stats;
      const mbs = r.bytes / 1e6 / sec;
      addRow({
        test: `import ${name}${codec === Codec.Zstd ? ' (level 3)' : ''}`, m: { mbs, otherCpu: other() }, vs: mbs / base.get('image read')!.mbs,
        notes: `${sec.toFixed(2)} s; ratio ${((st.storedBlocks * BS) / st.compressedBytes).toFixed(2)} (${(st.storedBlocks * BS / MiB).toFixed(0)} MiB stored → ${(st.compressedBytes / MiB).toFixed(0)} MiB); ` +
          `${st.zeroBlocks} zero, ${st.dedupBlocks} dedup, ${st.storedBlocks} stored blocks; ${st.frames} frames`,
      });
    }

    // ---- 2. warm device
    section(2, 'strata device (in-process, warm template cache)');
    const h = layers.zstd;
    const dev = await engA.openDevice(h.chain[0]);
    syncDisks();
    {
      log('prefetch whole device (fills the template cache)');
      const f0 = engA.stats().cache.fetches;
      const t = performance.now(), other = cpuMeter();
      await dev.prefetch(0, dev.size);
      const sec = (performance.now() - t) / 1000;
      const fetched = engA.stats().cache.fetches - f0;
      addRow({ test: 'prefetch all frames (cold → warm)', m: { mbs: h.dataSize / 1e6 / sec, otherCpu: other() }, vs: (h.dataSize / 1e6 / sec) / base.get('seq read 128K QD8')!.mbs,
        notes: `${sec.toFixed(2)} s; ${fetched} frame fetches; MB/s of decompressed data` });
    }
    const imgSamples = imageSamples(img.file, 512);
    await checkSamples(dev, imgSamples, 'warm device vs image');
    const dblocks = dataBlocks(h);
    const zeroShare = 1 - dblocks.length / (h.virtualSize / BS);
    const [rr, rw, sr, sw] = SHAPES;
    const vs = (s: Shape, m: Measure) => m.iops / base.get(s.name)!.iops;
    {
      log(`device ${rr.name} (data blocks)`);
      const m = await deviceShape(dev, rr, () => dblocks[randBlock(dblocks.length)] * BS);
      addRow({ test: `device ${rr.name}`, m, vs: vs(rr, m), notes: 'blocks mapped to stored data only' });
    }
    {
      log(`device ${rr.name} (whole device)`);
      const m = await deviceShape(dev, rr);
      addRow({ test: `device ${rr.name}, whole device`, m, vs: vs(rr, m), notes: `${(zeroShare * 100).toFixed(0)}% of blocks are zero extents (memset, no I/O)` });
    }
    {
      log(`device ${sr.name} (data chunks)`);
      const chunks = dataChunks(h, sr.len);
      let i = 0;
      const m = await deviceShape(dev, sr, () => { const c = chunks[i++]; if (i >= chunks.length) i = 0; return c; });
      addRow({ test: `device ${sr.name}`, m, vs: vs(sr, m), notes: '128K chunks holding stored data, in device order' });
    }
    {
      log(`device ${rw.name}`);
      const m = await deviceShape(dev, rw);
      addRow({ test: `device ${rw.name}`, m, vs: vs(rw, m), notes: 'first writes fill the sparse overlay\'s holes' });
    }
    let covered = 0;
    {
      log(`device ${sw.name}`);
      const cur = seqCursor(dev.size, sw.len);
      let wrote = 0;
      const m = await deviceShape(dev, sw, () => { wrote += sw.len; return cur(); });
      covered = Math.min(dev.size, wrote - sw.len * sw.qd);
      addRow({ test: `device ${sw.name}`, m, vs: vs(sw, m) });
    }
    if (covered >= MiB) {
      log(`device ${rr.name} (overlay)`);
      const cb = Math.floor(covered / BS);
      const m = await deviceShape(dev, rr, () => randBlock(cb) * BS);
      addRow({ test: `device ${rr.name}, overlay hits`, m, vs: vs(rr, m), notes: `blocks the seq-write test wrote (${(covered / MiB).toFixed(0)} MiB)` });
    }
    await engA.closeDevice(dev);

    // ---- 5. snapshot of dirty data
    section(5, `snapshot of ${SNAP / MiB} MiB of dirty data`);
    let snapLayer = '';
    const SAMPLE_EVERY = 1009;
    const snapSamples = new Map<number, Buffer>();
    {
      const sdev = await engA.openDevice(h.chain[0]);
      const pool = readPool(img.file, 64 * MiB);
      const fill = mixedFiller(pool);
      const ref = await sparseBaseline(ring, reg, work, 'seq write 1M QD4', SNAP, MiB, 4, true);
      syncDisks();
      log(`writing ${SNAP / MiB} MiB of mixed data (1 MiB sequential writes, QD4)`);
      // Data is generated in untimed batches; only the writes are timed.
      const BATCH = Math.min(SNAP, 32 * MiB);
      const batch = Buffer.alloc(BATCH);
      const lat = new Latencies();
      let ops = 0, writeMs = 0;
      const fillOther = cpuMeter();
      for (let b0 = 0; b0 < SNAP; b0 += BATCH) {
        const len = Math.min(BATCH, SNAP - b0);
        fill(batch.subarray(0, len), b0 / BS);
        for (let o = 0; o < len; o += SAMPLE_EVERY * BS) snapSamples.set(b0 + o, Buffer.from(batch.subarray(o, o + BS)));
        let next = 0;
        const t = performance.now();
        await Promise.all(Array.from({ length: 4 }, async () => {
          while (next < len) {
            const o = next; next += MiB;
            const s = performance.now();
            await sdev.write(b0 + o, batch.subarray(o, Math.min(len, o + MiB)));
            lat.push(performance.now() - s);
            ops++;
          }
        }));
        writeMs += performance.now() - t;
      }
      const wm = { ...summarize(ops, SNAP, writeMs / 1000, lat), otherCpu: fillOther() };
      ref.remove();
      addRow({ test: 'device seq write 1M QD4 (fill)', m: wm, vs: wm.mbs / ref.mbs,
        notes: 'mixed data: 15% zero, 25% random, 50% unique image-like, 10% copies of base blocks' });
      syncDisks();
      log('device.snapshot()');
      let lastPhase = '';
      const t2 = performance.now(), other = cpuMeter();
      const r = await sdev.snapshot({ onProgress: (p) => { if (p.phase !== lastPhase) { lastPhase = p.phase; log(`  snapshot: ${p.phase}`); } } });
      const sec = (performance.now() - t2) / 1000;
      const st = r.stats;
      const mbs = SNAP / 1e6 / sec;
      addRow({
        test: `snapshot ${SNAP / MiB} MiB dirty (zstd, default level)`, m: { mbs, otherCpu: other() }, vs: mbs / base.get('seq write 128K QD8')!.mbs,
        notes: `${sec.toFixed(2)} s; frozen ${r.frozenMs.toFixed(2)} ms; ratio ${st.compressedBytes ? ((st.storedBlocks * BS) / st.compressedBytes).toFixed(2) : '—'} ` +
          `(${(st.storedBlocks * BS / MiB).toFixed(0)} MiB stored → ${(st.compressedBytes / MiB).toFixed(0)} MiB); ${st.zeroBlocks} zero, ${st.dedupBlocks} dedup blocks`,
      });
      snapLayer = r.id;
      await checkSamples(sdev, snapSamples, 'snapshot device after rebase');
      await engA.closeDevice(sdev);
    }
    watchdogReaps.engines += engA.core.uring.stats.watchdogReaps ?? 0;
    await engA.close();
    engines.splice(engines.indexOf(engA), 1);

    // ---- 3. cold reads on a fresh engine
    section(3, 'cold reads: fresh engine and cache dir over the same store');
    for (const name of ['zstd', 'lz4'] as const) {
      syncDisks();
      const engB = await Engine.open({ store: storeDir, cacheDir: path.join(work, `cacheB-${name}`) });
      engines.push(engB);
      kickers.push({ name: `engine B (${name}) ring`, ring: () => (engines.includes(engB) ? engB.core.uring : null), fd: kickFd });
      const lh = await engB.inspect(layers[name].chain[0]);
      const cdev = await engB.openDevice(lh.chain[0]);
      const db = dataBlocks(lh);
      const buf = Array.from({ length: 32 }, () => Buffer.allocUnsafe(BS));
      log(`cold ${rr.name} on the ${name} layer (${COLD_OPS} reads)`);
      const m = await closedLoop(32, 3600, BS, (slot) => cdev.readInto(db.length ? db[randBlock(db.length)] * BS : 0, buf[slot]), COLD_OPS);
      const cs = engB.stats().cache;
      await checkSamples(cdev, imgSamples, `cold ${name} device vs image`);
      if (name === 'zstd' && snapLayer) {
        const sd = await engB.openDevice(snapLayer);
        await checkSamples(sd, snapSamples, 'snapshot layer on a fresh engine');
        await engB.closeDevice(sd);
      }
      addRow({ test: `cold ${rr.name} (${name} layer)`, m, vs: m.iops / base.get(rr.name)!.iops,
        notes: `${m.ops} reads in ${m.seconds.toFixed(2)} s; ${cs.fetches}/${lh.frames.length} frames fetched (${(cs.fetchBytes / MiB).toFixed(0)} MiB compressed), ` +
          `${((cs.fetches * lh.dataSize) / Math.max(1, lh.frames.length) / 1e6 / m.seconds).toFixed(0)} MB/s of frames decompressed` });
      watchdogReaps.engines += engB.core.uring.stats.watchdogReaps ?? 0;
      await engB.close();
      engines.splice(engines.indexOf(engB), 1);
    }

    // ---- print
    const date = new Date().toISOString().slice(0, 10);
    process.stdout.write(`\nstrata engine benchmark, ${date}, ${os.availableParallelism()} CPUs, ${os.cpus()[0]?.model ?? '?'}, Node ${process.version}, kernel ${os.release()}\n`);
    process.stdout.write(`device/image ${SIZE / MiB} MiB (${img.kind}), ${SECONDS} s per I/O test, files in ${os.tmpdir()} (page cache); MB = 10^6 bytes; ` +
      `load average at start ${LOAD0.toFixed(2)}, other processes used ${runOther().toFixed(2)} CPU on average (⚠ marks rows above ${CONTENDED}), total ${((performance.now() - T0) / 1000).toFixed(0)} s\n\n`);
    process.stdout.write(table() + '\n');
    if (surprises.length) process.stdout.write(`\nSurprises:\n${surprises.map((x) => `- ${x}`).join('\n')}\n`);
    const baseReaps = watchdogReaps.baseline + (ring.stats.watchdogReaps ?? 0);
    process.stdout.write(`\nuring.ts watchdog reaps (batches no eventfd wake-up delivered; should be 0): ` +
      `baseline ring ${baseReaps}, engine rings ${watchdogReaps.engines}\n`);

    // ---- 6. codecs
    if (CODEC_FRAMES > 0) {
      log(`codec table: ${CODEC_FRAMES} frames from the image`);
      const frames = framesFromImage(img.file, CODEC_FRAMES);
      const crow = await codecBench(frames);
      process.stdout.write('\n' + formatCodecTable(crow, frames.length, frames.reduce((a, f) => a + f.length, 0)) + '\n');
    }
  } finally {
    for (const e of engines) await e.close().catch(() => {});
    for (const c of closers) { try { c(); } catch { /* already closed */ } }
    stopWatchdog();
    cleanup();
    log('done');
  }
}

main().catch((e) => { console.error(e); process.exitCode = 1; });
