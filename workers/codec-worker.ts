// piscina worker hosting strata's WASM over the engine's shared memory. It
// does the CPU-heavy per-frame work: fingerprinting blocks (zero test, xxh64,
// sha-256), compressing frames and verifying + decompressing fetched frames.
// Data stays in the shared memory: the main thread passes offsets, not bytes.
import { workerData } from 'worker_threads';
import * as fs from 'fs';
import { createHash } from 'crypto';
import { instantiate, WasmExports } from '../src/wasm';
import { compress, decompressInto } from '../src/codec';
import { Codec } from '../src/format';
import { ebadmsg } from '../src/errors';

const memory: WebAssembly.Memory = workerData.memory;
const wasm: WasmExports = instantiate(memory);
const BS = 4096;
const view = (off: number, len: number) => Buffer.from(memory.buffer, off, len);

export interface Run { fileOffset: number; blocks: number }

/** pread `runs` back to back into [ptr, ...); short reads past EOF read as zeros. */
function readRuns(fd: number, runs: Run[], ptr: number): number {
  let at = ptr;
  for (const r of runs) {
    const len = r.blocks * BS;
    const dst = view(at, len);
    let got = 0;
    while (got < len) {
      const n = fs.readSync(fd, dst, got, len - got, r.fileOffset + got);
      if (n === 0) { dst.fill(0, got); break; }
      got += n;
    }
    at += len;
  }
  return at - ptr;
}

export interface ScanTask { op: 'scan'; fd: number; runs: Run[]; ptr: number; hashPtr: number; zeroPtr: number; shaPtr: number }
export interface PackTask { op: 'pack'; fd: number; runs: Run[]; ptr: number; cPtr: number; cCap: number; codec: Codec; level: number }
/** `prio`: the fetch's Priority (src/fetch-queue.ts), for the pool's queue (src/task-queue.ts). */
export interface UnframeTask { op: 'unframe'; codec: Codec; cPtr: number; cSize: number; checksum: string; outPtr: number; uSize: number; prio?: number }
export interface HashTask { op: 'hash'; ptr: number; len: number }
export type Task = ScanTask | PackTask | UnframeTask | HashTask;

/** xxh64 (seed 0) of [ptr, ptr+len) as hex: frames' uncompressed sums, which the local cache keeps. */
const hash = (ptr: number, len: number) => BigInt.asUintN(64, wasm.xxh64(ptr, len, 0n)).toString(16);

/** Reads blocks and writes, per block: zero flag, xxh64 and a 16-byte sha-256 prefix. */
function scan(t: ScanTask): number {
  const len = readRuns(t.fd, t.runs, t.ptr);
  const n = len / BS;
  const zeros = wasm.hashBlocks(t.ptr, n, BS, 0n, t.hashPtr, t.zeroPtr);
  const u8 = new Uint8Array(memory.buffer);
  for (let i = 0; i < n; i++) {
    if (u8[t.zeroPtr + i]) continue;
    createHash('sha256').update(view(t.ptr + i * BS, BS)).digest().copy(u8, t.shaPtr + i * 16, 0, 16);
  }
  return zeros;
}

/**
 * Reads blocks into ptr (left there: the caller may seed a cache from them),
 * compresses them into [cPtr, cPtr+cCap) and returns the size and checksum.
 */
function pack(t: PackTask): { cSize: number; checksum: string; uSize: number; uSum: string } {
  const len = readRuns(t.fd, t.runs, t.ptr);
  const uSum = hash(t.ptr, len);
  const out = compress(t.codec, view(t.ptr, len), t.level);
  if (out.length > t.cCap) throw new Error(`compressed frame of ${out.length} bytes exceeds its ${t.cCap}-byte slot`);
  new Uint8Array(memory.buffer).set(out, t.cPtr);
  return { cSize: out.length, checksum: hash(t.cPtr, out.length), uSize: len, uSum };
}

/**
 * Verifies a fetched frame's checksum, then decompresses it into outPtr.
 * Integrity failures come back as a value: thrown errors lose their errno
 * code crossing the thread boundary.
 */
function unframe(t: UnframeTask): { ok: true; size: number; uSum: string } | { ok: false; code: string; message: string } {
  try {
    const sum = hash(t.cPtr, t.cSize);
    if (sum !== t.checksum) throw ebadmsg(`frame checksum mismatch (stored ${t.checksum}, computed ${sum})`);
    const size = decompressInto(t.codec, view(t.cPtr, t.cSize), view(t.outPtr, t.uSize));
    return { ok: true, size, uSum: hash(t.outPtr, size) };
  } catch (e) {
    const err = e as { code?: string; message: string };
    return { ok: false, code: err.code ?? 'EIO', message: err.message };
  }
}

export default function run(t: Task): unknown {
  switch (t.op) {
    case 'scan': return scan(t);
    case 'pack': return pack(t);
    case 'unframe': return unframe(t);
    case 'hash': return hash(t.ptr, t.len);
  }
}
