// A device's gate and stripes: how the engine (JavaScript on the main
// thread) and the I/O workers (this module on their threads) share one
// device's tables. Record layout: layout.ts, GATE.
//
// The engine publishes the device's view and guards every change of it,
// and its own requests, with the gate: while it holds the gate as a writer
// no worker request starts (they go to the engine instead of waiting), and
// it waits for those in flight. As a reader it keeps only worker *writes*
// out. Worker requests exclude each other per 4 KiB stripe, so a read never
// sees half of a concurrent write (hazard H1); stripes are only tried (a
// worker holds them across asynchronous I/O on its ring, so blocking on one
// could deadlock that thread), and a busy stripe makes a request wait a few
// turns, then go to the engine. Every atomic here is sequentially
// consistent: a worker announces itself, then reads the engine's counters;
// the engine announces itself, then reads the workers'. One sees the other.
import {
  GATE_JS_WRITERS, GATE_JS_READERS, GATE_NAT_READERS, GATE_NAT_WRITERS, GATE_VIEW, GATE_REFS, GATE_DEV_SIZE,
  GATE_STATS, GS_FAST_READS, GS_FAST_WRITES, GS_SLOW_PLANS, GS_SLOW_GATE, GS_SLOW_BUSY, GS_READ_BYTES, GS_WRITE_BYTES,
  GS_LAT, GS_LAT_SUM, GATE_LAT_BUCKETS, GATE_STRIPES, GATE_NSTRIPES, GATE_BYTES,
} from './layout';
import { planLocal, planWrite, wrote } from './plan';

/** readStart / writeStart: nothing is held, the request goes to the engine. */
export const GATE_SLOW: i32 = -1;
/** readStart / writeStart: another request holds a stripe (nothing held): try again next turn. */
export const GATE_BUSY: i32 = -3;

const STRIPE_SHIFT: u64 = 12;

export function gateInit(g: usize, size: f64): void {
  memory.fill(g, 0, GATE_BYTES);
  store<u64>(g + GATE_DEV_SIZE, <u64>size);
  atomic.store<i32>(g + GATE_REFS, 1);
}

/** One more holder (a channel that will serve the device). */
export function gateRetain(g: usize): void { atomic.add<i32>(g + GATE_REFS, 1); }
/** A holder let go; returns how many are left (0: the record may be freed). */
export function gateDrop(g: usize): i32 { return atomic.sub<i32>(g + GATE_REFS, 1) - 1; }
export function gateRefs(g: usize): i32 { return atomic.load<i32>(g + GATE_REFS); }

// ------------------------------------------------------------ the engine's side

/** Enters the gate; true once no conflicting worker request is in flight (else poll gateDrained). */
export function gateEnter(g: usize, writer: bool): bool {
  atomic.add<i32>(g + (writer ? GATE_JS_WRITERS : GATE_JS_READERS), 1);
  return gateDrained(g, writer);
}

export function gateDrained(g: usize, writer: bool): bool {
  return atomic.load<i32>(g + GATE_NAT_WRITERS) == 0 && (!writer || atomic.load<i32>(g + GATE_NAT_READERS) == 0);
}

export function gateExit(g: usize, writer: bool): void {
  atomic.sub<i32>(g + (writer ? GATE_JS_WRITERS : GATE_JS_READERS), 1);
}

/** Publishes the device's VIEW record (0: none); false unless the gate is held as a writer with the workers drained. */
export function gateSetView(g: usize, view: u32): bool {
  if (atomic.load<i32>(g + GATE_JS_WRITERS) == 0 || !gateDrained(g, true)) return false;
  atomic.store<u32>(g + GATE_VIEW, view);
  return true;
}

/**
 * The engine's own requests take the stripes of their blocks too, so a
 * worker request meets only the engine requests on its own range. The span
 * is widened to whole blocks and capped at one turn of the stripes.
 */
export function gateLockRange(g: usize, offset: f64, length: f64, exclusive: bool, blockSize: u32): bool {
  if (length == 0) return true;
  const a = blockStart(offset, blockSize);
  return lockStripes(g, a, blockSpan(offset, length, blockSize, a), exclusive);
}

export function gateUnlockRange(g: usize, offset: f64, length: f64, blockSize: u32): void {
  if (length == 0) return;
  const a = blockStart(offset, blockSize);
  unlockStripes(g, a, blockSpan(offset, length, blockSize, a));
}

function blockStart(offset: f64, bs: u32): u64 { return <u64>offset / <u64>bs * <u64>bs; }
function blockSpan(offset: f64, length: f64, bs: u32, a: u64): u64 {
  const end = (<u64>offset + <u64>length + <u64>bs - 1) / <u64>bs * <u64>bs;
  return min(end - a, <u64>GATE_NSTRIPES << STRIPE_SHIFT);
}

/** Counter `i` (GS_*) as a number. */
export function gateStat(g: usize, i: u32): f64 {
  return <f64>atomic.load<u64>(g + GATE_STATS + <usize>i * 8);
}

/** Upper bound (ns) of latency bucket i; the last bucket (GATE_LAT_BUCKETS - 1) has none: 0. */
export function gateLatBound(i: u32): f64 {
  // 10 µs .. 100 ms in 1-2.5-5 steps, then 1 s and 10 s.
  switch (i) {
    case 0: return 1e4; case 1: return 2.5e4; case 2: return 5e4;
    case 3: return 1e5; case 4: return 2.5e5; case 5: return 5e5;
    case 6: return 1e6; case 7: return 2.5e6; case 8: return 5e6;
    case 9: return 1e7; case 10: return 2.5e7; case 11: return 5e7;
    case 12: return 1e8; case 13: return 1e9; case 14: return 1e10;
    default: return 0;
  }
}

// ------------------------------------------------------------ a worker's side
// One request is readStart + readEnd, or writeStart + writeEnd: the gate,
// its stripes, the planner and the counters in one call each.

/**
 * A READ of [offset, offset+length) planned into SEG records at `out`
 * (room for `cap`; assembly/plan.ts, planLocal): the segment count, with
 * the gate and stripes held until readEnd; GATE_SLOW (the engine's:
 * nothing held) or, unless `final`, GATE_BUSY.
 */
export function readStart(g: usize, offset: f64, length: u32, final: bool, blockSize: u32, out: usize, cap: u32): i32 {
  const view = acquire(g, false, <u64>offset, <u64>length, final);
  if (view <= 1) return view == 1 ? GATE_BUSY : GATE_SLOW;
  const bs = <u64>blockSize, off = <u64>offset;
  const n = planLocal(view, <u32>(off / bs), <u32>((off + <u64>length + bs - 1) / bs), blockSize, out, cap);
  if (n < 0) { unplanned(g, false, off, <u64>length); return GATE_SLOW; }
  return n;
}

/** Ends a started READ; `ok`: its data was delivered; `ns`: its service time. */
export function readEnd(g: usize, offset: f64, length: u32, ok: bool, ns: f64): void {
  release(g, false, <u64>offset, <u64>length, ok, <u64>ns);
}

/**
 * A WRITE of [offset, offset+length) by the write rule (plan.ts,
 * planWrite): the file its bytes go to at `offset`, with the gate and
 * stripes held until writeEnd; GATE_SLOW or GATE_BUSY as readStart.
 */
export function writeStart(g: usize, offset: f64, length: u32, final: bool, blockSize: u32): i32 {
  const view = acquire(g, true, <u64>offset, <u64>length, final);
  if (view <= 1) return view == 1 ? GATE_BUSY : GATE_SLOW;
  const fd = planWrite(view, offset, <f64>length, blockSize);
  if (fd < 0) { unplanned(g, true, <u64>offset, <u64>length); return GATE_SLOW; }
  return fd;
}

/** Ends a started WRITE; `ok`: every byte is in the file (its blocks become DIRTY only then). */
export function writeEnd(g: usize, offset: f64, length: u32, ok: bool, ns: f64, blockSize: u32): void {
  // The view cannot change while this write is counted in the gate.
  if (ok) wrote(<usize>atomic.load<u32>(g + GATE_VIEW), offset, <f64>length, blockSize);
  release(g, true, <u64>offset, <u64>length, ok, <u64>ns);
}

/** The view to plan from, 0 (engine; nothing held) or 1 (busy stripe and not final; nothing held). */
function acquire(g: usize, w: bool, off: u64, len: u64, final: bool): usize {
  if (g == 0) return 0;
  const size = load<u64>(g + GATE_DEV_SIZE);
  if (len == 0 || off > size || len > size - off) return 0;
  const mine = g + (w ? GATE_NAT_WRITERS : GATE_NAT_READERS);
  atomic.add<i32>(mine, 1);
  const view = <usize>atomic.load<u32>(g + GATE_VIEW);
  if (atomic.load<i32>(g + GATE_JS_WRITERS) != 0 || (w && atomic.load<i32>(g + GATE_JS_READERS) != 0) || view == 0) {
    atomic.sub<i32>(mine, 1);
    bump(g, GS_SLOW_PLANS, 1);
    bump(g, GS_SLOW_GATE, 1);
    return 0;
  }
  if (!lockStripes(g, off, len, w)) {
    atomic.sub<i32>(mine, 1);
    if (!final) return 1;
    bump(g, GS_SLOW_PLANS, 1);
    bump(g, GS_SLOW_BUSY, 1);
    return 0;
  }
  return view;
}

function release(g: usize, w: bool, off: u64, len: u64, ok: bool, ns: u64): void {
  if (ok) {
    bump(g, w ? GS_FAST_WRITES : GS_FAST_READS, 1);
    bump(g, w ? GS_WRITE_BYTES : GS_READ_BYTES, len);
    let i: u32 = 0;
    while (i < GATE_LAT_BUCKETS - 1 && <f64>ns > gateLatBound(i)) i++; // the first bucket whose bound is not below ns
    bump(g, GS_LAT + (w ? GATE_LAT_BUCKETS : 0) + i, 1);
    bump(g, GS_LAT_SUM + (w ? 1 : 0), ns);
  }
  unlockStripes(g, off, len);
  atomic.sub<i32>(g + (w ? GATE_NAT_WRITERS : GATE_NAT_READERS), 1);
}

/** Ends an acquired request the planner could not place: it goes to the engine. */
function unplanned(g: usize, w: bool, off: u64, len: u64): void {
  unlockStripes(g, off, len);
  atomic.sub<i32>(g + (w ? GATE_NAT_WRITERS : GATE_NAT_READERS), 1);
  bump(g, GS_SLOW_PLANS, 1);
}

function bump(g: usize, i: u32, by: u64): void { atomic.add<u64>(g + GATE_STATS + <usize>i * 8, by); }

// A stripe is a count: > 0 readers, -1 one writer. A request covering every
// stripe takes them all; indexes wrap around, each taken once.
function stripe(g: usize, i: u64): usize { return g + GATE_STRIPES + <usize>(i % <u64>GATE_NSTRIPES) * 4; }

function stripeCount(off: u64, len: u64): u64 {
  const n = ((off + len - 1) >> STRIPE_SHIFT) - (off >> STRIPE_SHIFT) + 1;
  return min(n, <u64>GATE_NSTRIPES);
}

function tryStripe(s: usize, excl: bool): bool {
  let v = atomic.load<i32>(s);
  if (excl) return v == 0 && atomic.cmpxchg<i32>(s, 0, -1) == 0;
  while (v >= 0) {
    const seen = atomic.cmpxchg<i32>(s, v, v + 1);
    if (seen == v) return true;
    v = seen;
  }
  return false;
}

function dropStripe(s: usize): void {
  // Held by the caller: -1 means it is the writer, otherwise one of the readers.
  if (atomic.load<i32>(s) == -1) atomic.store<i32>(s, 0);
  else atomic.sub<i32>(s, 1);
}

function lockStripes(g: usize, off: u64, len: u64, excl: bool): bool {
  const first = off >> STRIPE_SHIFT, n = stripeCount(off, len);
  for (let k: u64 = 0; k < n; k++) {
    if (!tryStripe(stripe(g, first + k), excl)) {
      for (let j: u64 = 0; j < k; j++) dropStripe(stripe(g, first + j));
      return false;
    }
  }
  return true;
}

function unlockStripes(g: usize, off: u64, len: u64): void {
  const first = off >> STRIPE_SHIFT, n = stripeCount(off, len);
  for (let k: u64 = 0; k < n; k++) dropStripe(stripe(g, first + k));
}
