// The WASM read planner (assembly/plan.ts) over a hand-made view: the
// current overlay first, then frozen overlays newest first, then the base
// mapping; contiguous pieces merged; offsets relative to the request.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { SharedHeap, S } from '../src/wasm';
import { ViewRecord, ReadPlanner, SegKind } from '../src/device-view';
import { ZERO_LAYER } from '../src/format';

const B = 4096;
const heap = new SharedHeap({ reserveBytes: 65536 });
const w = heap.wasm;

function table(states: number[]): number {
  const t = heap.alloc(states.length);
  states.forEach((v, i) => w.stateSet(t, i, v));
  return t;
}
const { ABSENT: A, DIRTY: D, ZERO: Z, CLEAN: C } = S;
const NAME: Record<number, string> = { [SegKind.File]: 'File', [SegKind.Zero]: 'Zero', [SegKind.Layer]: 'Layer' };

function plan(rec: ViewRecord, b0: number, b1: number, planner = new ReadPlanner(heap)) {
  const out: Array<[string, number, number, number, number]> = [];
  planner.plan(rec, b0, b1, B, (kind, ref, off, len, dst) => out.push([NAME[kind], ref, off, len, dst]));
  return out;
}

// base: blocks 0..4 layer 0 (data 0), 4..6 zero, 6..8 layer 1 (data 8 blocks in)
const ext = heap.alloc(3 * 32);
w.extentPut(ext, 0, 0n, BigInt(4 * B), 0, 0n);
w.extentPut(ext, 1, BigInt(4 * B), BigInt(2 * B), ZERO_LAYER, 0n);
w.extentPut(ext, 2, BigInt(6 * B), BigInt(2 * B), 1, BigInt(8 * B));
const layers = [null, null];

test('current overlay, then frozen ones newest first, then the base', () => {
  const cur = { fd: 10, table: table([D, D, Z, A, A, A, A, C]) };
  const older = { fd: 11, table: table([A, A, A, D, Z, A, D, A]) };
  const newer = { fd: 12, table: table([A, A, A, A, A, A, D, A]) };
  const rec = new ViewRecord(heap, { cur, frozen: [older, newer], ext, nExt: 3, layers });
  assert.equal(plan(rec, 0, 8), [
    ['File', 10, 0, 2 * B, 0],
    ['Zero', -1, 0, B, 2 * B],
    ['File', 11, 3 * B, B, 3 * B],
    ['Zero', -1, 0, 2 * B, 4 * B], // a frozen ZERO block and a zero extent, merged
    ['File', 12, 6 * B, B, 6 * B], // the newer frozen overlay wins over the older
    ['Layer', 1, 9 * B, B, 7 * B], // CLEAN in the overlay: the base's bytes
  ]);
  // offsets are the request's
  assert.equal(plan(rec, 1, 4), [['File', 10, B, B, 0], ['Zero', -1, 0, B, B], ['File', 11, 3 * B, B, 2 * B]]);
  rec.retire();
});

test('nothing written: the base alone, contiguous layer data merged across blocks; a plan longer than the first buffer grows it', () => {
  const rec = new ViewRecord(heap, { cur: { fd: 10, table: table(new Array(8).fill(A)) }, frozen: [], ext, nExt: 3, layers });
  assert.equal(plan(rec, 0, 8), [['Layer', 0, 0, 4 * B, 0], ['Zero', -1, 0, 2 * B, 4 * B], ['Layer', 1, 8 * B, 2 * B, 6 * B]]);
  rec.retire();
  // every other block written: 64 blocks, 64 segments (more than the planner's first buffer)
  const n = 4096;
  const big = heap.alloc(32);
  w.extentPut(big, 0, 0n, BigInt(n * B), 0, 0n);
  const rec2 = new ViewRecord(heap, { cur: { fd: 9, table: table(Array.from({ length: n }, (_, i) => (i % 2 ? D : A))) }, frozen: [], ext: big, nExt: 1, layers: [null] });
  const segs = plan(rec2, 0, n);
  assert.is(segs.length, n);
  assert.equal(segs[1], ['File', 9, B, B, B]);
  assert.equal(segs[n - 2], ['Layer', 0, (n - 2) * B, B, (n - 2) * B]);
  rec2.retire();
});

test('a range longer than one WASM plan (2^18 blocks) is planned in pieces whose offsets continue', () => {
  const n = (1 << 18) + 5;
  const big = heap.alloc(32);
  w.extentPut(big, 0, 0n, BigInt(n * B), 0, BigInt(B));
  const cur = table(new Array(n).fill(A));
  w.stateSet(cur, n - 2, D);
  const rec = new ViewRecord(heap, { cur: { fd: 5, table: cur }, frozen: [], ext: big, nExt: 1, layers: [null] });
  assert.equal(plan(rec, 0, n), [
    ['Layer', 0, B, (1 << 18) * B, 0],
    ['Layer', 0, ((1 << 18) + 1) * B, 3 * B, (1 << 18) * B],
    ['File', 5, (n - 2) * B, B, (n - 2) * B],
    ['Layer', 0, n * B, B, (n - 1) * B],
  ]);
  rec.retire();
});

test('a view whose mapping does not cover the range is an error, not a short plan', () => {
  const short = heap.alloc(32);
  w.extentPut(short, 0, 0n, BigInt(2 * B), 0, 0n);
  const rec = new ViewRecord(heap, { cur: { fd: 9, table: table(new Array(4).fill(A)) }, frozen: [], ext: short, nExt: 1, layers: [null] });
  assert.throws(() => plan(rec, 0, 4), /does not cover/);
  rec.retire();
});

test.run();
