// The engine's rules for a READ or WRITE an I/O worker serves itself, for
// any frontend on its loop (an NBD connection today): the device's gate and
// stripes (its native target), the WASM planner over the engine's shared
// tables (assembly/plan.ts), and the write rule. What a request cannot be
// placed by these goes to the engine on the main thread; the frontend keeps
// only its protocol.
import * as native from '../native';
import type { NativeDeviceTarget } from '../native';
import type { WasmExports } from '../wasm';
import { layout } from '../wasm';
import type { Channel, IoLoop } from './loop';
import * as slabs from './slabs';

const { READ } = native.OP;
const off = slabs.offsetOf;

/** What a frontend takes per request from its device's native target (DeviceTarget). */
export type RequestGate = Pick<NativeDeviceTarget, 'acquire' | 'release' | 'close'>;

/** The gate of an export with no device behind it: every request takes the slow path. */
export const NO_DEVICE: RequestGate = { acquire: () => 0, release: () => {}, close: () => {} };

/** The worker's planner: WASM over the engine's memory, with room for segments. */
export interface Planner { wasm: WasmExports; view: DataView; segs: number; segCap: number; blockSize: number }

/** acquire(): the stripes are held by another request (it ends soon): try again next turn. */
export const BUSY = 1;
/** Turns a request waits for busy stripes before it goes the slow path. */
const BUSY_TURNS = 64;

export class BlockIo {
  private busyTurns = 0;
  private readonly SEG_SIZE: number;
  private readonly SEG_KIND: number;
  private readonly SEG_REF: number;
  private readonly SEG_OFF: number;
  private readonly SEG_LEN: number;
  private readonly SEG_DST: number;
  private readonly SEG_ZERO: number;

  constructor(private readonly loop: IoLoop, readonly target: RequestGate, private readonly plan: Planner) {
    const l = layout();
    this.SEG_SIZE = l.SEG_SIZE; this.SEG_KIND = l.SEG_KIND; this.SEG_REF = l.SEG_REF; this.SEG_OFF = l.SEG_OFF;
    this.SEG_LEN = l.SEG_LEN; this.SEG_DST = l.SEG_DST; this.SEG_ZERO = l.SEG_ZERO;
  }

  /** Ring entries a read may need (one per segment). */
  get readRoom(): number { return this.plan.segCap; }

  /**
   * The gate and stripes of a request: its view, 0 (slow path) or BUSY for a
   * few turns (another request holds its stripes: it waits rather than burden
   * the engine, whose own request on those blocks would have to wait too);
   * `owner` is pumped again next turn.
   */
  acquire(owner: Channel, write: boolean, offset: number, length: number): number {
    const v = this.target.acquire(write, offset, length, this.busyTurns >= BUSY_TURNS);
    if (v === BUSY) { this.busyTurns++; this.loop.retry(owner); return BUSY; }
    this.busyTurns = 0;
    return v;
  }

  /**
   * Places an acquired READ of [offset, offset+length) into slot + at: zero
   * pieces are filled now, file pieces pushed on the loop as `owner`'s
   * operations with `tag` (see completeRead). Returns how many were pushed,
   * or -1: the planner cannot place it (the gate is released; slow path).
   * The caller checked room(readRoom).
   */
  read(owner: Channel, tag: number, view: number, offset: number, length: number, slot: number, at: number): number {
    const { wasm, segs, segCap, blockSize: bs } = this.plan;
    const b0 = Math.floor(offset / bs), b1 = Math.ceil((offset + length) / bs);
    const n = wasm.planLocal(view, b0, b1, bs, segs, segCap);
    if (n < 0) { this.target.release(false, offset, length, -1, 0); return -1; }
    const buf = this.loop.slabs.buf(slot), so = off(slot);
    const m = this.plan.view, head = offset - b0 * bs;
    let pushed = 0;
    for (let i = 0; i < n; i++) {
      const s = segs + i * this.SEG_SIZE;
      const dst = m.getUint32(s + this.SEG_DST, true), len = m.getUint32(s + this.SEG_LEN, true);
      const a = Math.max(dst, head), e = Math.min(dst + len, head + length);
      if (a >= e) continue;
      const to = at + (a - head);
      if (m.getUint32(s + this.SEG_KIND, true) === this.SEG_ZERO) { buf.fill(0, so + to, so + to + (e - a)); continue; }
      const fileOff = m.getUint32(s + this.SEG_OFF, true) + m.getUint32(s + this.SEG_OFF + 4, true) * 0x100000000 + (a - dst);
      this.loop.push(owner, tag, READ, m.getInt32(s + this.SEG_REF, true), slot, to, e - a, fileOff);
      pushed++;
    }
    return pushed;
  }

  /** One of a read's file operations finished: 0, or the errno it failed with. A short read is past the file's end: zeros. */
  completeRead(res: number, op: number): number {
    if (res < 0) return -res;
    const want = this.loop.opLen[op];
    if (res < want) {
      const at = this.loop.opPos[op] + res;
      this.loop.slabs.buf(at).fill(0, off(at), off(at) + want - res);
    }
    return 0;
  }

  /**
   * A WRITE of the bytes at slot + at: planned and written now, on this
   * thread (a buffered write cannot complete inline in the ring on ext4;
   * io-wq would take it to another thread, which halves small-write
   * throughput). Returns bytes written or -errno, 'busy' (pumped again next
   * turn) or 'slow' (nothing held: the engine's).
   */
  write(owner: Channel, offset: number, length: number, slot: number, at: number): number | 'busy' | 'slow' {
    const view = this.acquire(owner, true, offset, length);
    if (view === BUSY) return 'busy';
    if (!view) return 'slow';
    const { wasm, blockSize: bs } = this.plan;
    const fd = wasm.planWrite(view, offset, length, bs);
    if (fd < 0) { this.target.release(true, offset, length, -1, 0); return 'slow'; }
    const res = this.loop.pwrite(slot, at, length, fd, offset);
    // The write rule: its blocks are DIRTY only once the bytes are in the file.
    if (res >= 0) wasm.wrote(view, offset, length, bs);
    this.target.release(true, offset, length, res >= 0 ? 1 : 0, (performance.now() - this.loop.now) * 1e6);
    return res;
  }

  /** Ends an acquired READ (started at loop time t0). */
  readDone(offset: number, length: number, ok: boolean, t0: number): void {
    this.target.release(false, offset, length, ok ? 1 : 0, (this.loop.now - t0) * 1e6);
  }
}
