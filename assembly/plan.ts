// The read planner: where each byte of a block range of a device lives, as
// its view (layout.ts) says — the current overlay, then frozen overlays
// newest first, then the base mapping. The one place that knows the lookup
// order: the engine's reads and block status use it.
import {
  CACHED, DIRTY, ZERO, FRAME_SIZE, FRAME_U, FRAME_USIZE, LAYER_SIZE, LYR_FD, LYR_STATES, LYR_FRAMES, LYR_NFRAMES, LYR_REFS, VIEW_NLAYERS, VIEW_LAYERS, ZERO_LAYER, EXTENT_SIZE, EXT_DEV, EXT_LEN, EXT_LAYER, EXT_DATA,
  VIEW_CUR_FD, VIEW_CUR_TABLE, VIEW_NFROZEN, VIEW_FROZEN, VIEW_EXT, VIEW_NEXT,
  OVERLAY_SIZE, OVL_FD, OVL_TABLE, SEG_SIZE, SEG_KIND, SEG_REF, SEG_OFF, SEG_LEN, SEG_DST,
  SEG_FILE, SEG_ZERO, SEG_LAYER,
} from './layout';
import { runEnd, findExtent, findFrame } from './index';

// Every function takes the output (ptr, cap), the block size, the request's
// first block and the segments so far, and returns the new count or -1 (out
// of room, or a gap in the mapping): the module keeps no state of its own.

/** Appends a segment, merged into the last one when it continues it. */
function emit(out: usize, cap: u32, n: i32, kind: u32, ref: i32, off: u64, len: u64, dst: u64): i32 {
  if (n > 0) {
    const l = out + <usize>(n - 1) * SEG_SIZE;
    const lLen = <u64>load<u32>(l + SEG_LEN);
    if (load<u32>(l + SEG_KIND) == kind && load<i32>(l + SEG_REF) == ref && <u64>load<u32>(l + SEG_DST) + lLen == dst &&
        (kind == SEG_ZERO || load<u64>(l + SEG_OFF) + lLen == off) && lLen + len <= 0xffffffff) {
      store<u32>(l + SEG_LEN, <u32>(lLen + len));
      return n;
    }
  }
  if (<u32>n >= cap) return -1;
  const r = out + <usize>n * SEG_SIZE;
  store<u32>(r + SEG_KIND, kind);
  store<i32>(r + SEG_REF, ref);
  store<u64>(r + SEG_OFF, kind == SEG_ZERO ? 0 : off);
  store<u32>(r + SEG_LEN, <u32>len);
  store<u32>(r + SEG_DST, <u32>dst);
  return n + 1;
}

/** Blocks [x, xe) of the base mapping. */
function base(view: usize, out: usize, cap: u32, bs: u64, b0: u64, n: i32, x: u64, xe: u64): i32 {
  const ext = <usize>load<u32>(view + VIEW_EXT);
  const count = load<u32>(view + VIEW_NEXT);
  let pos = x * bs;
  const end = xe * bs;
  let i = findExtent(ext, count, pos);
  if (i < 0) return -1;
  for (; pos < end && <u32>i < count && n >= 0; i++) {
    const r = ext + <usize>i * EXTENT_SIZE;
    const dev = load<u64>(r + EXT_DEV), len = load<u64>(r + EXT_LEN);
    const take = min(end, dev + len) - pos;
    const layer = load<u32>(r + EXT_LAYER);
    const dst = pos - b0 * bs;
    n = layer == ZERO_LAYER ? emit(out, cap, n, SEG_ZERO, -1, 0, take, dst)
      : emit(out, cap, n, SEG_LAYER, <i32>layer, load<u64>(r + EXT_DATA) + (pos - dev), take, dst);
    pos += take;
  }
  return pos >= end ? n : -1;
}

/** Blocks [x, xe) at level lv (nFrozen: the current overlay; below: frozen ones, newest first; -1: the base). */
function level(view: usize, out: usize, cap: u32, bs: u64, b0: u64, n: i32, lv: i32, x: u64, xe: u64): i32 {
  if (lv < 0) return base(view, out, cap, bs, b0, n, x, xe);
  let fd: i32, table: usize;
  if (lv == <i32>load<u32>(view + VIEW_NFROZEN)) {
    fd = load<i32>(view + VIEW_CUR_FD);
    table = <usize>load<u32>(view + VIEW_CUR_TABLE);
  } else {
    const ov = <usize>load<u32>(view + VIEW_FROZEN) + <usize>lv * OVERLAY_SIZE;
    fd = load<i32>(ov + OVL_FD);
    table = <usize>load<u32>(ov + OVL_TABLE);
  }
  for (let b = x; b < xe && n >= 0;) {
    const be = <u64>runEnd(table, <u32>b, <u32>xe);
    const st = atomic.load<u8>(table + <usize>b);
    // An overlay holds DIRTY and ZERO blocks; anything else is the level below's.
    if (st == DIRTY) n = emit(out, cap, n, SEG_FILE, fd, b * bs, (be - b) * bs, (b - b0) * bs);
    else if (st == ZERO) n = emit(out, cap, n, SEG_ZERO, -1, 0, (be - b) * bs, (b - b0) * bs);
    else n = level(view, out, cap, bs, b0, n, lv - 1, b, be);
    b = be;
  }
  return n;
}

/**
 * Plans blocks [b0, b1) of the device `view` describes into SEG records at
 * `out` (room for `cap`), in request order, contiguous pieces merged.
 * Returns the segment count, or -1 when `cap` was too small (or the view
 * does not cover the range: a bug).
 */
export function planRead(view: usize, b0: u32, b1: u32, blockSize: u32, out: usize, cap: u32): i32 {
  return level(view, out, cap, <u64>blockSize, <u64>b0, 0, <i32>load<u32>(view + VIEW_NFROZEN), <u64>b0, <u64>b1);
}

/**
 * planRead for a request an I/O worker serves itself: layer pieces become
 * file pieces of their layer's cache file when every frame under them is
 * CACHED (each marked recently read, for the eviction clock). Returns the
 * count, -1 when out of room, or -2 when some piece needs the engine (a
 * frame not cached, a layer without a cache file).
 */
export function planLocal(view: usize, b0: u32, b1: u32, blockSize: u32, out: usize, cap: u32): i32 {
  const n = planRead(view, b0, b1, blockSize, out, cap);
  for (let i = 0; i < n; i++) {
    const s = out + <usize>i * SEG_SIZE;
    if (load<u32>(s + SEG_KIND) != SEG_LAYER) continue;
    const layer = load<u32>(s + SEG_REF);
    if (layer >= load<u32>(view + VIEW_NLAYERS)) return -2;
    const L = <usize>load<u32>(view + VIEW_LAYERS) + <usize>layer * LAYER_SIZE;
    const fd = load<i32>(L + LYR_FD);
    const nFrames = load<u32>(L + LYR_NFRAMES);
    if (fd < 0 || nFrames == 0) return -2;
    const frames = <usize>load<u32>(L + LYR_FRAMES), states = <usize>load<u32>(L + LYR_STATES), refs = <usize>load<u32>(L + LYR_REFS);
    const off = load<u64>(s + SEG_OFF), end = off + <u64>load<u32>(s + SEG_LEN);
    let f = findFrame(frames, nFrames, off);
    if (f < 0) return -2;
    for (let at = off; at < end; f++) {
      if (<u32>f >= nFrames) return -2;
      const r = frames + <usize>f * FRAME_SIZE;
      const u = load<u64>(r + FRAME_U);
      if (at < u || at >= u + <u64>load<u32>(r + FRAME_USIZE)) return -2;
      if (atomic.load<u8>(states + <usize>f) != CACHED) return -2;
      // Stored only when it changes: the mark is read by the evictor's clock.
      if (refs != 0 && load<u8>(refs + <usize>f) == 0) store<u8>(refs + <usize>f, 1);
      at = u + <u64>load<u32>(r + FRAME_USIZE);
    }
    store<u32>(s + SEG_KIND, SEG_FILE);
    store<i32>(s + SEG_REF, fd);
  }
  return n;
}

/**
 * The write rule, for a write of [off, off+len) bytes: it goes to the current
 * overlay file (returned), unless a partial block there is not DIRTY yet (-1:
 * the engine copies the block's old contents first).
 */
export function planWrite(view: usize, offset: f64, length: f64, blockSize: u32): i32 {
  // Byte offsets come as f64 (exact below 2^53): no BigInt per request on the JS side.
  const off = <u64>offset, bs = <u64>blockSize, end = off + <u64>length;
  const table = <usize>load<u32>(view + VIEW_CUR_TABLE);
  if (off % bs != 0 && atomic.load<u8>(table + <usize>(off / bs)) != DIRTY) return -1;
  if (end % bs != 0 && atomic.load<u8>(table + <usize>(end / bs)) != DIRTY) return -1;
  return load<i32>(view + VIEW_CUR_FD);
}

/** After a planned write's bytes are in the overlay file: its blocks are DIRTY (never before). */
export function wrote(view: usize, offset: f64, length: f64, blockSize: u32): void {
  const off = <u64>offset, len = <u64>length, bs = <u64>blockSize;
  const table = <usize>load<u32>(view + VIEW_CUR_TABLE);
  for (let b = off / bs; b < (off + len + bs - 1) / bs; b++) atomic.store<u8>(table + <usize>b, DIRTY);
}
