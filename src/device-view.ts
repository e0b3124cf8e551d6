// A device's view in shared memory (assembly/layout.ts, VIEW records): its
// current and frozen overlays, its base mapping and its chain's layer
// caches, as the WASM read planner (assembly/plan.ts) takes them. A device
// writes a new record whenever its view changes; a request pins the record
// it planned with, and a replaced record is freed once no request holds it.
import type { SharedHeap } from './wasm';
import { layout } from './wasm';

export interface ViewParts {
  cur: { fd: number; table: number };
  /** Oldest first. */
  frozen: Array<{ fd: number; table: number }>;
  ext: number; nExt: number;
  /** By chain index; null for layers the mapping never reads. */
  layers: Array<{ fd: number; states: number; frames: number; nframes: number; refs: number } | null>;
}

/** Something readers pin so it is not torn down under them (H14): overlays, bases, view records. */
export class Pinned {
  refs = 0;
  retired = false;
  constructor(private readonly teardown: () => void) {}
  pin(): void { this.refs++; }
  unpin(): void { if (--this.refs === 0 && this.retired) this.teardown(); }
  retire(): void { this.retired = true; if (this.refs === 0) this.teardown(); }
}

export class ViewRecord extends Pinned {
  readonly ptr: number;

  constructor(heap: SharedHeap, p: ViewParts) {
    let ptr = 0;
    super(() => heap.free(ptr));
    const l = layout();
    const frozenAt = l.VIEW_SIZE, layersAt = frozenAt + p.frozen.length * l.OVERLAY_SIZE;
    this.ptr = ptr = heap.alloc(layersAt + p.layers.length * l.LAYER_SIZE);
    const v = new DataView(heap.buffer, this.ptr, layersAt + p.layers.length * l.LAYER_SIZE);
    v.setInt32(l.VIEW_CUR_FD, p.cur.fd, true);
    v.setUint32(l.VIEW_CUR_TABLE, p.cur.table, true);
    v.setUint32(l.VIEW_NFROZEN, p.frozen.length, true);
    v.setUint32(l.VIEW_FROZEN, this.ptr + frozenAt, true);
    v.setUint32(l.VIEW_EXT, p.ext, true);
    v.setUint32(l.VIEW_NEXT, p.nExt, true);
    v.setUint32(l.VIEW_NLAYERS, p.layers.length, true);
    v.setUint32(l.VIEW_LAYERS, this.ptr + layersAt, true);
    p.frozen.forEach((o, i) => {
      v.setInt32(frozenAt + i * l.OVERLAY_SIZE + l.OVL_FD, o.fd, true);
      v.setUint32(frozenAt + i * l.OVERLAY_SIZE + l.OVL_TABLE, o.table, true);
    });
    p.layers.forEach((c, i) => {
      const o = layersAt + i * l.LAYER_SIZE;
      v.setInt32(o + l.LYR_FD, c?.fd ?? -1, true);
      v.setUint32(o + l.LYR_STATES, c?.states ?? 0, true);
      v.setUint32(o + l.LYR_FRAMES, c?.frames ?? 0, true);
      v.setUint32(o + l.LYR_NFRAMES, c?.nframes ?? 0, true);
      v.setUint32(o + l.LYR_REFS, c?.refs ?? 0, true);
    });
  }
}

export const enum SegKind { File = 1, Zero = 2, Layer = 3 }

const CHUNK_BLOCKS = 1 << 18;

/** The planner's output buffer, one per engine (planning is synchronous: nothing else runs meanwhile). */
export class ReadPlanner {
  private ptr = 0;
  private cap = 0;
  constructor(private readonly heap: SharedHeap) {}

  /**
   * Calls fn for each piece of blocks [b0, b1) as `view` resolves them, in
   * order: kind, the file (File) or chain index (Layer), the offset in it,
   * the length and the piece's offset in the request. Planned 2^18 blocks at
   * a time (the WASM plan addresses its range with 32-bit offsets).
   */
  plan(view: ViewRecord, b0: number, b1: number, blockSize: number,
    fn: (kind: SegKind, ref: number, off: number, len: number, dst: number) => void): void {
    for (let c0 = b0; c0 < b1; c0 += CHUNK_BLOCKS) this.planChunk(view, c0, Math.min(b1, c0 + CHUNK_BLOCKS), blockSize, (c0 - b0) * blockSize, fn);
  }

  /** One chunk; `at`: its offset in the request. */
  private planChunk(view: ViewRecord, b0: number, b1: number, blockSize: number, at: number,
    fn: (kind: SegKind, ref: number, off: number, len: number, dst: number) => void): void {
    const l = layout(), w = this.heap.wasm;
    let n = this.cap ? w.planRead(view.ptr, b0, b1, blockSize, this.ptr, this.cap) : -1;
    while (n < 0) {
      if (this.cap >= 4 * (b1 - b0) + 16) throw new Error(`read plan of blocks ${b0}..${b1}: the view does not cover them`);
      if (this.cap) this.heap.free(this.ptr);
      this.cap = Math.max(64, this.cap * 2, Math.min(4 * (b1 - b0) + 16, 4096));
      this.ptr = this.heap.alloc(this.cap * l.SEG_SIZE);
      n = w.planRead(view.ptr, b0, b1, blockSize, this.ptr, this.cap);
    }
    const v = new DataView(this.heap.buffer, this.ptr, n * l.SEG_SIZE);
    for (let i = 0; i < n; i++) {
      const o = i * l.SEG_SIZE;
      fn(v.getUint32(o + l.SEG_KIND, true) as SegKind, v.getInt32(o + l.SEG_REF, true), Number(v.getBigUint64(o + l.SEG_OFF, true)),
        v.getUint32(o + l.SEG_LEN, true), at + v.getUint32(o + l.SEG_DST, true));
    }
    // A rare huge plan (block status over a fragmented GiB) does not keep its buffer.
    if (this.cap > 4096) { this.heap.free(this.ptr); this.cap = 0; }
  }
}
