// Mapping algebra over layer extents: overlaying a child's changes onto its
// parent's mapping, and normalizing (done in WASM, see assembly normalize()).
import type { Extent } from './format';
import { ZERO_LAYER } from './format';
import { layout, type SharedHeap } from './wasm';

/** The parent's extents as seen from a child: every layer index moves up by one. */
export function shiftForChild(parent: Extent[]): Extent[] {
  return parent.map((e) => ({ ...e, layer: e.layer === ZERO_LAYER ? ZERO_LAYER : e.layer + 1 }));
}

/** Marks extents of layers a compacted child drops; the child's changes must cover every one. */
export const DROPPED_LAYER = 0xfffffffe;

/**
 * The parent's extents as seen from a compacted child whose chain is
 * [child, ...keep.map(i => parent chain[i])]: kept layers get their new
 * index, the others DROPPED_LAYER.
 */
export function remapForChild(parent: Extent[], keep: readonly number[]): Extent[] {
  const to = new Map(keep.map((i, k) => [i, k + 1]));
  return parent.map((e) => ({ ...e, layer: e.layer === ZERO_LAYER ? ZERO_LAYER : to.get(e.layer) ?? DROPPED_LAYER }));
}

/**
 * Lays `changes` (sorted, non-overlapping, block aligned) over `base` (sorted,
 * covering the device). Parts of base extents that a change hides are cut,
 * with their data offsets advanced so they keep pointing at the same bytes.
 */
export function overlay(base: Extent[], changes: Extent[]): Extent[] {
  const out: Extent[] = [];
  let ci = 0;
  for (const b of base) {
    let pos = b.dev;
    const end = b.dev + b.len;
    while (pos < end) {
      while (ci < changes.length && changes[ci].dev + changes[ci].len <= pos) ci++;
      const c = changes[ci];
      if (!c || c.dev >= end) { out.push(cut(b, pos, end)); break; }
      if (c.dev > pos) { out.push(cut(b, pos, c.dev)); pos = c.dev; continue; }
      // c covers pos: emit the part of c inside this base extent once.
      const cEnd = Math.min(c.dev + c.len, end);
      out.push(cut(c, pos, cEnd));
      pos = cEnd;
    }
  }
  return out;
}

function cut(e: Extent, from: number, to: number): Extent {
  return { dev: from, len: to - from, layer: e.layer, data: e.layer === ZERO_LAYER ? 0 : e.data + (from - e.dev) };
}

/** Merges neighbours (only storage-contiguous runs, H13) using the WASM normalizer. */
export function normalize(heap: SharedHeap, ext: Extent[]): Extent[] {
  if (ext.length === 0) return ext;
  const w = heap.wasm;
  const ptr = heap.alloc(ext.length * layout().EXTENT_SIZE);
  try {
    storeExtents(heap, ptr, ext);
    const n = w.normalize(ptr, ext.length);
    const out: Extent[] = [];
    for (let i = 0; i < n; i++) {
      out.push({ dev: Number(w.extentDev(ptr, i)), len: Number(w.extentLen(ptr, i)), layer: w.extentLayer(ptr, i) >>> 0, data: Number(w.extentData(ptr, i)) });
    }
    return out;
  } finally { heap.free(ptr); }
}

/** Writes extents as records (assembly/layout.ts) at ptr. */
function storeExtents(heap: SharedHeap, ptr: number, ext: Extent[]): void {
  ext.forEach((e, i) => heap.wasm.extentPut(ptr, i, BigInt(e.dev), BigInt(e.len), e.layer, BigInt(e.data)));
}

/** Extents copied into shared memory for WASM binary search during reads. */
export class MappingTable {
  readonly ptr: number;
  constructor(private readonly heap: SharedHeap, readonly extents: Extent[]) {
    this.ptr = heap.alloc(Math.max(1, extents.length) * layout().EXTENT_SIZE);
    storeExtents(heap, this.ptr, extents);
  }

  /** Index of the extent holding device byte `off`. */
  find(off: number): number {
    return this.heap.wasm.findExtent(this.ptr, this.extents.length, BigInt(off));
  }

  free(): void { this.heap.free(this.ptr); }
}
