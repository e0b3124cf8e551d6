// The engine's rules for a READ or WRITE an I/O worker serves itself, for
// any frontend on its loop (an NBD connection, a ublk queue): the device's
// gate and stripes, the planner and the write rule, each request's start
// and end one WASM call over the engine's shared tables (assembly/gate.ts).
// What a request cannot be placed by these goes to the engine on the main
// thread; the frontend keeps only its protocol.
import * as native from '../native';
import type { WasmExports } from '../wasm';
import { layout } from '../wasm';
import type { Channel, IoLoop } from './loop';
import * as slabs from './slabs';

const { READ } = native.OP;
const off = slabs.offsetOf;

/** The worker's planner: WASM over the engine's memory, with room for segments. */
export interface Planner { wasm: WasmExports; view: DataView; segs: number; segCap: number; blockSize: number }

/** completeRead(): one more operation was pushed for the read. */
export const MORE = -1;
const EIO = 5;

/** Turns a request waits for busy stripes before it goes the slow path. */
const BUSY_TURNS = 64;

/**
 * How a frontend's requests are placed: the engine's (BlockIo) or a plain
 * file's (FileIo). A frontend calls read (then completeRead per operation,
 * readDone) or write, or writeStart + writeEnd around a write the ring
 * performs. 'busy': another request holds its blocks (the owner is pumped
 * again next turn: try then); 'slow': the engine's (nothing held).
 */
export interface Placement {
  /** Ring entries a read may need. */
  readonly readRoom: number;
  read(owner: Channel, tag: number, offset: number, length: number, slot: number, at: number, fixed?: number, zeroFd?: number): number | 'busy' | 'slow';
  completeRead(res: number, op: number, owner?: Channel, tag?: number, zeroFd?: number): number;
  readDone(offset: number, length: number, ok: boolean, t0: number): void;
  write(owner: Channel, offset: number, length: number, slot: number, at: number): number | 'busy' | 'slow';
  writeStart(owner: Channel, offset: number, length: number): number | 'busy' | 'slow';
  writeEnd(offset: number, length: number, ok: boolean, t0: number, t1?: number): void;
  /**
   * A FLUSH, or a DISCARD / WRITE_ZEROES of [offset, offset+length), as
   * one operation of owner's `tag` (its result answers the request), or
   * false: the engine's.
   */
  flush(owner: Channel, tag: number): boolean;
  discard(owner: Channel, tag: number, offset: number, length: number): boolean;
  /** The frontend is done with the device (once). */
  close(): void;
}

/**
 * Pushes a read of len bytes of fd at fileOffset into slot + at, or with
 * `fixed` into that slot of the ring's sparse table at `at`.
 */
export function pushRead(loop: IoLoop, owner: Channel, tag: number, fd: number, slot: number, at: number, len: number, fileOffset: number, fixed: number): void {
  if (fixed < 0) loop.push(owner, tag, READ, fd, slot, at, len, fileOffset);
  else loop.pushFixed(owner, tag, READ, fd, fixed, at, len, fileOffset);
}

/**
 * One of a read's file operations finished: 0, or the errno it failed
 * with. A short read is past the file's end: zeros. Into a fixed slot they
 * are read from `zeroFd` by one more operation of owner's `tag`: then MORE
 * (the read is not done yet).
 */
export function completeRead(loop: IoLoop, res: number, op: number, owner?: Channel, tag = 0, zeroFd = -1): number {
  if (res < 0) return -res;
  const want = loop.opLen[op];
  if (res < want) {
    const fixed = loop.fixedIndex(op);
    if (fixed >= 0) {
      if (!owner || !loop.room(1)) return EIO;
      loop.pushFixed(owner, tag, READ, zeroFd, fixed, loop.opPos[op] + res, want - res, 0);
      return MORE;
    }
    const at = loop.opPos[op] + res;
    loop.slabs.buf(at).fill(0, off(at), off(at) + want - res);
  }
  return 0;
}

export class BlockIo implements Placement {
  private busyTurns = 0;
  private closed = false;
  private readonly SEG_SIZE: number;
  private readonly SEG_KIND: number;
  private readonly SEG_REF: number;
  private readonly SEG_OFF: number;
  private readonly SEG_LEN: number;
  private readonly SEG_DST: number;
  private readonly SEG_ZERO: number;
  private readonly BUSY: number;

  /** `gate`: the device's gate record (held for this frontend by the pool; 0: no device, every request is the engine's). */
  constructor(private readonly loop: IoLoop, private readonly gate: number, private readonly plan: Planner) {
    const l = layout();
    this.SEG_SIZE = l.SEG_SIZE; this.SEG_KIND = l.SEG_KIND; this.SEG_REF = l.SEG_REF; this.SEG_OFF = l.SEG_OFF;
    this.SEG_LEN = l.SEG_LEN; this.SEG_DST = l.SEG_DST; this.SEG_ZERO = l.SEG_ZERO; this.BUSY = l.GATE_BUSY;
  }

  /** Ring entries a read may need (one per segment). */
  get readRoom(): number { return this.plan.segCap; }

  /**
   * A busy stripe (another request holds it: it ends soon) makes a request
   * wait a few turns rather than burden the engine, whose own request on
   * those blocks would have to wait too; `owner` is pumped again next turn.
   */
  private refused(owner: Channel, code: number): 'busy' | 'slow' {
    if (code !== this.BUSY) { this.busyTurns = 0; return 'slow'; }
    this.busyTurns++;
    this.loop.retry(owner);
    return 'busy';
  }

  /**
   * Places a READ of [offset, offset+length) into slot + at: zero pieces
   * are filled now, file pieces pushed on the loop as `owner`'s operations
   * with `tag` (see completeRead); returns how many were pushed (the
   * stripes held until readDone). With `fixed` (a ublk zero-copy request's
   * slot in the ring's sparse table, see IoLoop.pushFixed) the bytes go
   * there instead, at `at`, and zero pieces are read from `zeroFd`
   * (/dev/zero): that memory is only reachable through the ring. The
   * caller checked room(readRoom).
   */
  read(owner: Channel, tag: number, offset: number, length: number, slot: number, at: number, fixed = -1, zeroFd = -1): number | 'busy' | 'slow' {
    const { wasm, segs, segCap, blockSize: bs } = this.plan;
    const n = wasm.readStart(this.gate, offset, length, this.busyTurns >= BUSY_TURNS ? 1 : 0, bs, segs, segCap);
    if (n < 0) return this.refused(owner, n);
    this.busyTurns = 0;
    const buf = fixed < 0 ? this.loop.slabs.buf(slot) : null, so = fixed < 0 ? off(slot) : 0;
    const m = this.plan.view, head = offset % bs;
    let pushed = 0;
    for (let i = 0; i < n; i++) {
      const s = segs + i * this.SEG_SIZE;
      const dst = m.getUint32(s + this.SEG_DST, true), len = m.getUint32(s + this.SEG_LEN, true);
      const a = Math.max(dst, head), e = Math.min(dst + len, head + length);
      if (a >= e) continue;
      const to = at + (a - head);
      const zero = m.getUint32(s + this.SEG_KIND, true) === this.SEG_ZERO;
      if (zero && buf) { buf.fill(0, so + to, so + to + (e - a)); continue; }
      const fileOff = zero ? 0 : m.getUint32(s + this.SEG_OFF, true) + m.getUint32(s + this.SEG_OFF + 4, true) * 0x100000000 + (a - dst);
      pushRead(this.loop, owner, tag, zero ? zeroFd : m.getInt32(s + this.SEG_REF, true), slot, to, e - a, fileOff, fixed);
      pushed++;
    }
    return pushed;
  }

  completeRead(res: number, op: number, owner?: Channel, tag = 0, zeroFd = -1): number {
    return completeRead(this.loop, res, op, owner, tag, zeroFd);
  }

  /** Ends a placed READ (started at loop time t0). */
  readDone(offset: number, length: number, ok: boolean, t0: number): void {
    this.plan.wasm.readEnd(this.gate, offset, length, ok ? 1 : 0, (this.loop.now - t0) * 1e6);
  }

  /**
   * A WRITE of the bytes at slot + at: planned and written now, on this
   * thread (a buffered write cannot complete inline in the ring on ext4;
   * io-wq would take it to another thread, which halves small-write
   * throughput). Returns bytes written or -errno, 'busy' or 'slow'.
   */
  write(owner: Channel, offset: number, length: number, slot: number, at: number): number | 'busy' | 'slow' {
    const fd = this.writeStart(owner, offset, length);
    if (typeof fd !== 'number') return fd;
    const t0 = this.loop.now;
    const res = this.loop.pwrite(slot, at, length, fd, offset);
    this.writeEnd(offset, length, res >= 0, t0, performance.now());
    return res;
  }

  /**
   * Begins a WRITE of [offset, offset+length): the file its bytes go to, at
   * `offset` (the stripes held until writeEnd), or 'busy' / 'slow'. For a
   * write the ring performs (zero copy).
   */
  writeStart(owner: Channel, offset: number, length: number): number | 'busy' | 'slow' {
    const fd = this.plan.wasm.writeStart(this.gate, offset, length, this.busyTurns >= BUSY_TURNS ? 1 : 0, this.plan.blockSize);
    if (fd < 0) return this.refused(owner, fd);
    this.busyTurns = 0;
    return fd;
  }

  /** Ends a started WRITE; `ok`: every byte is in the file (started at loop time t0, ended at t1): only then are its blocks DIRTY. */
  writeEnd(offset: number, length: number, ok: boolean, t0: number, t1 = this.loop.now): void {
    this.plan.wasm.writeEnd(this.gate, offset, length, ok ? 1 : 0, (t1 - t0) * 1e6, this.plan.blockSize);
  }

  // The engine's: its flush syncs overlays and zero journals; discards change the tables.
  flush(): boolean { return false; }
  discard(): boolean { return false; }

  close(): void {
    if (this.closed || !this.gate) return;
    this.closed = true;
    this.plan.wasm.gateDrop(this.gate);
  }
}
