// Loads build/strata.wasm over one shared WebAssembly.Memory. Every thread
// that needs the state machine or hashing instantiates the module over the
// same memory (the module holds no static data), so state written by one is
// seen by all. The host owns the layout: see RangeAllocator.
import * as fs from 'fs';
import * as path from 'path';
import { RangeAllocator } from './alloc';

/** The layout constants assembly/layout.ts exports (as globals). */
const LAYOUT_NAMES = ['ABSENT', 'FETCHING', 'CACHED', 'DIRTY', 'ZERO', 'CLEAN',
  'EXTENT_SIZE', 'EXT_DEV', 'EXT_LEN', 'EXT_LAYER', 'EXT_DATA', 'ZERO_LAYER',
  'FRAME_SIZE', 'FRAME_U', 'FRAME_C', 'FRAME_USIZE', 'FRAME_CSIZE', 'FRAME_SUM',
  'VIEW_SIZE', 'VIEW_CUR_FD', 'VIEW_CUR_TABLE', 'VIEW_NFROZEN', 'VIEW_FROZEN', 'VIEW_EXT', 'VIEW_NEXT', 'VIEW_NLAYERS', 'VIEW_LAYERS',
  'OVERLAY_SIZE', 'OVL_FD', 'OVL_TABLE', 'LAYER_SIZE', 'LYR_FD', 'LYR_STATES', 'LYR_FRAMES', 'LYR_NFRAMES', 'LYR_REFS',
  'SEG_SIZE', 'SEG_KIND', 'SEG_REF', 'SEG_OFF', 'SEG_LEN', 'SEG_DST', 'SEG_FILE', 'SEG_ZERO', 'SEG_LAYER',
  'GATE_BYTES', 'GATE_LAT_BUCKETS', 'GS_FAST_READS', 'GS_FAST_WRITES', 'GS_SLOW_PLANS', 'GS_SLOW_GATE', 'GS_SLOW_BUSY',
  'GS_READ_BYTES', 'GS_WRITE_BYTES', 'GS_LAT', 'GS_LAT_SUM', 'GATE_SLOW', 'GATE_BUSY'] as const;
// i32 values (the rest are u32).
const SIGNED = new Set<string>(['GATE_SLOW', 'GATE_BUSY']);
export type LayoutName = typeof LAYOUT_NAMES[number];

export interface WasmExports {
  stateGet(table: number, i: number): number;
  stateSet(table: number, i: number, v: number): void;
  stateCas(table: number, i: number, expect: number, desired: number): number;
  stateFill(table: number, start: number, count: number, v: number): void;
  runEnd(table: number, start: number, end: number): number;
  countState(table: number, start: number, end: number, v: number): number;
  isZero(ptr: number, len: number): number;
  zeroFill(ptr: number, len: number): void;
  xxh64(ptr: number, len: number, seed: bigint): bigint;
  hashBlocks(ptr: number, n: number, blockSize: number, seed: bigint, outHash: number, outZero: number): number;
  equalBytes(a: number, b: number, len: number): number;
  findExtent(ext: number, count: number, off: bigint): number;
  normalize(ext: number, count: number): number;
  validateExtents(ext: number, count: number, size: bigint, layers: number): number;
  findFrame(frames: number, count: number, off: bigint): number;
  extentPut(ext: number, i: number, dev: bigint, len: bigint, layer: number, data: bigint): void;
  extentDev(ext: number, i: number): bigint;
  extentLen(ext: number, i: number): bigint;
  extentLayer(ext: number, i: number): number;
  extentData(ext: number, i: number): bigint;
  framePut(frames: number, i: number, u: bigint, c: bigint, uSize: number, cSize: number, sum: bigint): void;
  /** Segments of blocks [b0, b1) of a device view (assembly/plan.ts) into SEG records; -1 when out of room. */
  planRead(view: number, b0: number, b1: number, blockSize: number, out: number, cap: number): number;
  /** planRead with layer pieces resolved to cached frames' files; -2 when a piece needs the engine. */
  planLocal(view: number, b0: number, b1: number, blockSize: number, out: number, cap: number): number;
  /** The write rule: the current overlay's fd, or -1 when a partial block is not DIRTY there. */
  planWrite(view: number, offset: number, length: number, blockSize: number): number;
  /** Marks a planned write's blocks DIRTY once its bytes are in the overlay file. */
  wrote(view: number, offset: number, length: number, blockSize: number): void;

  // A device's gate and stripes (assembly/gate.ts). Flags are 0 or 1.
  gateInit(g: number, size: number): void;
  gateRetain(g: number): void;
  /** Holders left. */
  gateDrop(g: number): number;
  gateRefs(g: number): number;
  gateEnter(g: number, writer: number): number;
  gateDrained(g: number, writer: number): number;
  gateExit(g: number, writer: number): void;
  gateSetView(g: number, view: number): number;
  gateLockRange(g: number, offset: number, length: number, exclusive: number, blockSize: number): number;
  gateUnlockRange(g: number, offset: number, length: number, blockSize: number): void;
  gateStat(g: number, i: number): number;
  gateLatBound(i: number): number;
  /** Segments planned (gate and stripes held until readEnd), GATE_SLOW or GATE_BUSY. */
  readStart(g: number, offset: number, length: number, final: number, blockSize: number, out: number, cap: number): number;
  readEnd(g: number, offset: number, length: number, ok: number, ns: number): void;
  /** The file to write to (held until writeEnd), GATE_SLOW or GATE_BUSY. */
  writeStart(g: number, offset: number, length: number, final: number, blockSize: number): number;
  writeEnd(g: number, offset: number, length: number, ok: number, ns: number, blockSize: number): void;
}

export const PAGE = 65536;
const WASM_PATH = path.join(__dirname, '..', 'build', 'strata.wasm');
let compiled: WebAssembly.Module | undefined;

export function wasmModule(): WebAssembly.Module {
  if (!compiled) {
    if (!fs.existsSync(WASM_PATH)) throw new Error(`${WASM_PATH} is missing: run \`npm run setup\` to build it`);
    compiled = new WebAssembly.Module(fs.readFileSync(WASM_PATH));
  }
  return compiled;
}

export function instantiate(memory: WebAssembly.Memory): WasmExports {
  const inst = new WebAssembly.Instance(wasmModule(), { env: { memory } });
  return inst.exports as unknown as WasmExports;
}

let layoutValues: Record<LayoutName, number> | undefined;
/** The layout constants of assembly/layout.ts, as the compiled module exports them (u32 values unsigned). */
export function layout(): Record<LayoutName, number> {
  if (!layoutValues) {
    const memory = new WebAssembly.Memory({ initial: 1, maximum: 1, shared: true });
    const ex = new WebAssembly.Instance(wasmModule(), { env: { memory } }).exports as Record<string, unknown>;
    const out = {} as Record<LayoutName, number>;
    for (const k of LAYOUT_NAMES) {
      const g = ex[k];
      if (!(g instanceof WebAssembly.Global)) throw new Error(`build/strata.wasm exports no ${k}: rebuild it (npm run setup)`);
      out[k] = SIGNED.has(k) ? Number(g.value) : Number(g.value) >>> 0;
    }
    layoutValues = out;
  }
  return layoutValues;
}

/** Block and frame states (assembly/layout.ts). */
export const S = (() => {
  const l = layout();
  return { ABSENT: l.ABSENT, FETCHING: l.FETCHING, CACHED: l.CACHED, DIRTY: l.DIRTY, ZERO: l.ZERO, CLEAN: l.CLEAN } as const;
})();

/**
 * One shared memory plus its allocator and a view cache. `u8` is refreshed
 * after growth (a shared memory's buffer object is replaced when it grows).
 */
export class SharedHeap {
  readonly memory: WebAssembly.Memory;
  readonly wasm: WasmExports;
  readonly heap: RangeAllocator;
  private view: Uint8Array;

  constructor(opts: { reserveBytes: number; initialBytes?: number; maxBytes?: number }) {
    const reserve = roundUp(opts.reserveBytes, PAGE);
    const initial = Math.max(reserve + PAGE * 16, roundUp(opts.initialBytes ?? 0, PAGE));
    const max = opts.maxBytes ?? 4 * 1024 * 1024 * 1024 - PAGE;
    this.memory = new WebAssembly.Memory({ initial: initial / PAGE, maximum: Math.floor(max / PAGE), shared: true });
    this.wasm = instantiate(this.memory);
    this.view = new Uint8Array(this.memory.buffer);
    this.heap = new RangeAllocator(reserve, initial - reserve, 4096, (needEnd) => this.grow(needEnd));
  }

  /** Bytes of the memory; valid until the next growth. */
  get u8(): Uint8Array {
    if (this.view.byteLength !== this.memory.buffer.byteLength) this.view = new Uint8Array(this.memory.buffer);
    return this.view;
  }

  get buffer(): SharedArrayBuffer { return this.memory.buffer as unknown as SharedArrayBuffer; }

  /** A Buffer aliasing [off, off+len) of the shared memory (no copy). */
  slice(off: number, len: number): Buffer { return Buffer.from(this.memory.buffer, off, len); }

  alloc(bytes: number): number {
    const off = this.heap.alloc(bytes);
    if (off < 0) throw new Error(`shared heap exhausted allocating ${bytes} bytes`);
    return off;
  }

  free(off: number): void { this.heap.release(off); }

  private grow(needEnd: number): boolean {
    const cur = this.memory.buffer.byteLength;
    // Grow by at least 25% to keep the number of grow calls logarithmic.
    const want = roundUp(Math.max(needEnd, cur + cur / 4), PAGE);
    try { this.memory.grow((want - cur) / PAGE); } catch { return false; }
    this.heap.extend(this.memory.buffer.byteLength - this.heap.base);
    return true;
  }
}

export function roundUp(n: number, a: number): number { return Math.ceil(n / a) * a; }
