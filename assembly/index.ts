// strata's WASM core: block-state machine, read planning primitives, mapping
// algebra and dedup hashing over one shared WebAssembly.Memory.
//
// Several threads instantiate this module over the same memory, so it keeps
// no static data and allocates nothing: the host (src/wasm.ts) owns the
// layout and passes byte offsets. Multi-byte records are little-endian.

import { EXTENT_SIZE, EXT_DEV, EXT_LEN, EXT_LAYER, EXT_DATA, ZERO_LAYER, FRAME_SIZE, FRAME_U, FRAME_USIZE, extentPut } from './layout';
export * from './layout';
export { planRead, planLocal, planWrite, wrote } from './plan';
export * from './gate';

// ---------------------------------------------------------------- states
// One byte per block (values and record layouts: ./layout.ts). Transitions
// that can race between threads go through cmpxchg.
export function stateGet(table: usize, i: u32): u8 {
  return atomic.load<u8>(table + <usize>i);
}

export function stateSet(table: usize, i: u32, v: u8): void {
  atomic.store<u8>(table + <usize>i, v);
}

/** Compare-and-swap one block state; returns the previous value. */
export function stateCas(table: usize, i: u32, expect: u8, desired: u8): u8 {
  return atomic.cmpxchg<u8>(table + <usize>i, expect, desired);
}

export function stateFill(table: usize, start: u32, count: u32, v: u8): void {
  if (count == 0) return;
  memory.fill(table + <usize>start, v, <usize>count);
  // A seq-cst store publishes the plain fill to other threads.
  atomic.store<u8>(table + <usize>(start + count - 1), v);
}

/** End (exclusive) of the run of equal states that begins at `start`, capped at `end`. */
export function runEnd(table: usize, start: u32, end: u32): u32 {
  const v = load<u8>(table + <usize>start);
  let i = start + 1;
  // 16 blocks at a time while the whole vector matches.
  const splat = i8x16.splat(<i8>v);
  while (i + 16 <= end) {
    const m = i8x16.eq(v128.load(table + <usize>i), splat);
    if (!i8x16.all_true(m)) break;
    i += 16;
  }
  while (i < end && load<u8>(table + <usize>i) == v) i++;
  return i;
}

/** Number of blocks in [start, end) whose state equals v. */
export function countState(table: usize, start: u32, end: u32, v: u8): u32 {
  let n: u32 = 0;
  for (let i = start; i < end; i++) if (load<u8>(table + <usize>i) == v) n++;
  return n;
}

/**
 * memset 0 as one bulk-memory instruction: on shared memory it runs several
 * times faster than TypedArray.fill from JavaScript.
 */
export function zeroFill(ptr: usize, len: usize): void {
  memory.fill(ptr, 0, len);
}

// ---------------------------------------------------------------- zero test
export function isZero(ptr: usize, len: usize): bool {
  let i: usize = 0;
  // 64 bytes per iteration: OR four vectors, test once.
  while (i + 64 <= len) {
    const a = v128.or(v128.load(ptr + i), v128.load(ptr + i + 16));
    const b = v128.or(v128.load(ptr + i + 32), v128.load(ptr + i + 48));
    if (v128.any_true(v128.or(a, b))) return false;
    i += 64;
  }
  while (i < len) {
    if (load<u8>(ptr + i) != 0) return false;
    i++;
  }
  return true;
}

// ---------------------------------------------------------------- xxh64
const P1: u64 = 11400714785074694791;
const P2: u64 = 14029467366897019727;
const P3: u64 = 1609587929392839161;
const P4: u64 = 9650029242287828579;
const P5: u64 = 2870177450012600261;

// @ts-ignore: decorator
@inline function round(acc: u64, input: u64): u64 {
  acc += input * P2;
  acc = rotl<u64>(acc, 31);
  return acc * P1;
}

// @ts-ignore: decorator
@inline function mergeRound(acc: u64, val: u64): u64 {
  acc ^= round(0, val);
  return acc * P1 + P4;
}

/** XXH64 of [ptr, ptr+len) with `seed` (the reference algorithm). */
export function xxh64(ptr: usize, len: usize, seed: u64): u64 {
  let p = ptr;
  const end = ptr + len;
  let h: u64;
  if (len >= 32) {
    let v1 = seed + P1 + P2;
    let v2 = seed + P2;
    let v3 = seed;
    let v4 = seed - P1;
    const limit = end - 32;
    do {
      v1 = round(v1, load<u64>(p));
      v2 = round(v2, load<u64>(p + 8));
      v3 = round(v3, load<u64>(p + 16));
      v4 = round(v4, load<u64>(p + 24));
      p += 32;
    } while (p <= limit);
    h = rotl<u64>(v1, 1) + rotl<u64>(v2, 7) + rotl<u64>(v3, 12) + rotl<u64>(v4, 18);
    h = mergeRound(h, v1);
    h = mergeRound(h, v2);
    h = mergeRound(h, v3);
    h = mergeRound(h, v4);
  } else {
    h = seed + P5;
  }
  h += <u64>len;
  while (p + 8 <= end) {
    h ^= round(0, load<u64>(p));
    h = rotl<u64>(h, 27) * P1 + P4;
    p += 8;
  }
  if (p + 4 <= end) {
    h ^= <u64>load<u32>(p) * P1;
    h = rotl<u64>(h, 23) * P2 + P3;
    p += 4;
  }
  while (p < end) {
    h ^= <u64>load<u8>(p) * P5;
    h = rotl<u64>(h, 11) * P1;
    p++;
  }
  h ^= h >> 33;
  h *= P2;
  h ^= h >> 29;
  h *= P3;
  h ^= h >> 32;
  return h;
}

/**
 * Fingerprint `n` blocks of `blockSize` bytes at ptr: writes one u64 xxh64
 * per block to outHash (seed `seed`) and 1/0 per block to outZero (1 = all
 * zero). Returns the number of zero blocks.
 */
export function hashBlocks(ptr: usize, n: u32, blockSize: u32, seed: u64, outHash: usize, outZero: usize): u32 {
  let zeros: u32 = 0;
  for (let i: u32 = 0; i < n; i++) {
    const b = ptr + <usize>i * <usize>blockSize;
    const z = isZero(b, blockSize);
    store<u8>(outZero + <usize>i, z ? 1 : 0);
    if (z) zeros++;
    store<u64>(outHash + (<usize>i << 3), z ? 0 : xxh64(b, blockSize, seed));
  }
  return zeros;
}

export function equalBytes(a: usize, b: usize, len: usize): bool {
  let i: usize = 0;
  while (i + 16 <= len) {
    if (!i8x16.all_true(i8x16.eq(v128.load(a + i), v128.load(b + i)))) return false;
    i += 16;
  }
  while (i < len) {
    if (load<u8>(a + i) != load<u8>(b + i)) return false;
    i++;
  }
  return true;
}

// ---------------------------------------------------------------- mapping
// Extent records (./layout.ts) are sorted and cover the device without gaps.
/** Index of the extent holding byte `off`, or -1. Binary search. */
export function findExtent(ext: usize, count: u32, off: u64): i32 {
  let lo: i32 = 0;
  let hi: i32 = <i32>count - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1;
    const r = ext + <usize>mid * EXTENT_SIZE;
    const start = load<u64>(r + EXT_DEV);
    if (off < start) hi = mid - 1;
    else if (off >= start + load<u64>(r + EXT_LEN)) lo = mid + 1;
    else return mid;
  }
  return -1;
}

/**
 * Merge neighbours in place and return the new count. Two extents merge only
 * when they are adjacent on the device AND either both zero or in the same
 * layer with contiguous data offsets (hazard H13: merging same-layer runs that
 * are not contiguous in storage remaps reads to the wrong bytes). Zero-length
 * extents are dropped.
 */
export function normalize(ext: usize, count: u32): u32 {
  let w: u32 = 0;
  for (let i: u32 = 0; i < count; i++) {
    const r = ext + <usize>i * EXTENT_SIZE;
    const dev = load<u64>(r + EXT_DEV);
    const len = load<u64>(r + EXT_LEN);
    const layer = load<u32>(r + EXT_LAYER);
    const data = load<u64>(r + EXT_DATA);
    if (len == 0) continue;
    if (w > 0) {
      const p = ext + <usize>(w - 1) * EXTENT_SIZE;
      const pDev = load<u64>(p + EXT_DEV);
      const pLen = load<u64>(p + EXT_LEN);
      const pLayer = load<u32>(p + EXT_LAYER);
      const pData = load<u64>(p + EXT_DATA);
      if (pDev + pLen == dev && pLayer == layer && (layer == ZERO_LAYER || pData + pLen == data)) {
        store<u64>(p + EXT_LEN, pLen + len);
        continue;
      }
    }
    extentPut(ext, w, dev, len, layer, data);
    w++;
  }
  return w;
}

/** 1 when extents are sorted, gap-free from 0 and end exactly at `size`. */
export function validateExtents(ext: usize, count: u32, size: u64, layers: u32): bool {
  let pos: u64 = 0;
  for (let i: u32 = 0; i < count; i++) {
    const r = ext + <usize>i * EXTENT_SIZE;
    if (load<u64>(r + EXT_DEV) != pos) return false;
    const len = load<u64>(r + EXT_LEN);
    if (len == 0) return false;
    const layer = load<u32>(r + EXT_LAYER);
    if (layer != ZERO_LAYER && layer >= layers) return false;
    pos += len;
  }
  return pos == size;
}

// ---------------------------------------------------------------- frames
// Frame records: ./layout.ts.
/** Index of the frame holding uncompressed byte `off`, or -1. */
export function findFrame(frames: usize, count: u32, off: u64): i32 {
  let lo: i32 = 0;
  let hi: i32 = <i32>count - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1;
    const r = frames + <usize>mid * FRAME_SIZE;
    const start = load<u64>(r + FRAME_U);
    if (off < start) hi = mid - 1;
    else if (off >= start + <u64>load<u32>(r + FRAME_USIZE)) lo = mid + 1;
    else return mid;
  }
  return -1;
}
