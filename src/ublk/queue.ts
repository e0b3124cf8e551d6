// One ublk queue of one device, served by an I/O worker's loop (src/io/loop.ts):
// this worker's thread is the daemon of every tag. Each tag cycles
//   FETCH / COMMIT_AND_FETCH out -> a request in its descriptor -> data moved -> commit
// READs and WRITEs the device's view can place are served here with the
// engine's rules (src/io/block-io.ts), and a FileTarget's FLUSH, DISCARD
// and WRITE_ZEROES as one operation on its file; everything else (cold
// data, FUA, an engine device's FLUSH, DISCARD and WRITE_ZEROES,
// unplannable ranges) goes to the device on the main thread, whose answers
// come back through the worker's port.
// How data meets the request:
//   user copy  through a buffer of this loop: file -> buffer -> /dev/ublkcN
//              at the tag's position, and back for writes
//   zero copy  AUTO_BUF_REG puts the request's pages in a slot of the ring's
//              sparse table: file pieces READ_FIXED into it (zeros from
//              /dev/zero), writes WRITE_FIXED from it; data for or from the
//              main thread passes through a staging file (only the ring
//              reaches those pages).
import * as native from '../native';
import { MORE, type Placement } from '../io/block-io';
import type { Channel, IoLoop } from '../io/loop';
import * as slabs from '../io/slabs';
import { ublkAddon, UBLK_OP, type UblkUapi } from './native';

const { READ, WRITE, NOP } = native.OP;
const off = slabs.offsetOf;

/** What the main thread tells a worker about one queue it is to serve. */
export interface UblkQueueSpec {
  /** /dev/ublkcN, opened once by the main thread (the kernel allows one opener). */
  cdev: number;
  queue: number;
  depth: number;
  maxIo: number;
  zeroCopy: boolean;
  /** Device bytes: requests past it are the engine's (it answers them with an error). */
  size: number;
  /** Every request to the main thread (tests of the slow path). */
  alwaysSlow: boolean;
  /** A plain file the device maps 1:1 (FileIo), or -1: the engine's device (BlockIo). */
  file: number;
}

/** A request the worker hands to the main thread; `data`: a WRITE's bytes. */
export interface UblkSlowRequest { tag: number; op: number; flags: number; offset: number; length: number; data: Uint8Array | null }

/** What a worker posts about a queue. */
export type UblkQueueEvent =
  | { t: 'ublk-fetched'; id: number }
  | { t: 'ublk-requests'; id: number; reqs: UblkSlowRequest[] }
  | { t: 'closed'; id: number; reason: string; slotsKept?: boolean };

/** Counters the main thread reads without a message (a Float64Array over a SharedArrayBuffer). */
export const UBLK_STAT = { FAST: 0, SLOW: 1, SLOW_RW: 2, LENGTH: 3 } as const;

// Tag states. Those marked "todo" wait in `todo` for pump(), which pushes
// their next operation; the others wait for an operation or an answer.
const S_FETCH = 0; //         todo: its first FETCH
const S_CMD = 1; //           a FETCH or COMMIT_AND_FETCH is out
const S_NEW = 2; //           todo: a request to start
const S_READING = 3; //       file pieces on their way into the request (or its buffer)
const S_COPY_OUT = 4; //      todo: READ data to the request
const S_COPYING = 5; //       buffer -> request (user copy), staging -> request (zero copy)
const S_DATA_IN = 6; //       a WRITE's data on its way from the request into a buffer
const S_WRITE = 7; //         todo: a user-copy WRITE whose data is in its buffer
const S_WRITING = 8; //       zero copy: request -> file
const S_STAGE_IN = 9; //      zero copy, to the main thread: request -> staging
const S_STAGE_BACK = 10; //   todo: staging -> buffer
const S_STAGING_BACK = 11; // staging -> buffer
const S_SLOW = 12; //         at the main thread
const S_COMMIT = 13; //       todo: COMMIT_AND_FETCH with res
const S_DEAD = 14; //         the kernel ended it (or the queue closed)
const S_FILE_OP = 15; //      a FLUSH, DISCARD or WRITE_ZEROES on the file (FileIo)
const S_UNSTAGE_R = 16; //    zero copy: an answer is in the request, its staged copy punched out; then commit
const S_UNSTAGE_W = 17; //    zero copy: a WRITE's data is in a buffer, its staged copy punched out; then to the main thread

const EOPNOTSUPP = 95;

const TAG_FETCHED = -1;
const EMPTY = new Uint8Array(0);

/** Files a worker's zero-copy queues share: /dev/zero and a staging file. */
export interface ZeroCopyFiles { zero: number; stage: number }

export class UblkQueue implements Channel {
  private readonly u: UblkUapi;
  private readonly descs: DataView;
  private readonly st: Uint8Array;
  private readonly op: Uint8Array;
  private readonly slowW: Uint8Array;
  private readonly flags: Uint32Array;
  private readonly len: Uint32Array;
  private readonly at: Float64Array;
  private readonly slot: Float64Array;
  private readonly res: Int32Array;
  private readonly pending: Int32Array;
  private readonly err: Int32Array;
  private readonly t0: Float64Array;
  private readonly answers: Array<Uint8Array | null>;
  private todo: number[] = [];
  private kept: number[] = [];
  private spare: number[] = [];
  private toMain: UblkSlowRequest[] = [];
  private live: number;
  private closed = false;
  private dropped = false;
  /** Zero copy: each tag's slot in the ring's sparse table (AUTO_BUF_REG's index); null under user copy. */
  private readonly fixed: Int32Array | null;

  constructor(readonly id: number, private readonly loop: IoLoop, private readonly io: Placement, private readonly spec: UblkQueueSpec,
    private readonly zc: ZeroCopyFiles | null, private readonly stats: Float64Array, private readonly post: (e: UblkQueueEvent) => void) {
    this.u = ublkAddon().ublkUapi;
    const n = spec.depth;
    if (spec.zeroCopy) {
      if (!zc) throw new Error('zero copy needs the I/O worker\'s sparse buffer table, which this kernel refused');
      this.fixed = loop.takeFixed(n);
      if (!this.fixed) throw new Error(`no ${n} free slots left in this I/O worker's sparse buffer table`);
    } else this.fixed = null;
    this.descs = new DataView(ublkAddon().ublkIoDescs(spec.cdev, spec.queue, n));
    this.st = new Uint8Array(n).fill(S_FETCH);
    this.op = new Uint8Array(n);
    this.slowW = new Uint8Array(n);
    this.flags = new Uint32Array(n);
    this.len = new Uint32Array(n);
    this.at = new Float64Array(n);
    this.slot = new Float64Array(n).fill(-1);
    this.res = new Int32Array(n);
    this.pending = new Int32Array(n);
    this.err = new Int32Array(n);
    this.t0 = new Float64Array(n);
    this.answers = new Array(n).fill(null);
    this.live = n;
    for (let t = 0; t < n; t++) this.todo.push(t);
    loop.touch(this);
  }

  // ------------------------------------------------------ main thread's calls

  /** The main thread answered a slow request: result (bytes or -errno) and, for a READ, its data. */
  answer(tag: number, result: number, data: Uint8Array | null): void {
    if (this.st[tag] !== S_SLOW) return;
    if (result >= 0 && this.op[tag] === UBLK_OP.READ) {
      this.answers[tag] = data ?? EMPTY; // no data (or short): zeros
      this.st[tag] = S_COPY_OUT;
      this.todo.push(tag);
    } else this.commitLater(tag, result);
    this.loop.touch(this);
  }

  /**
   * Stop serving at once: no tag is committed again (the device is being
   * abandoned for recovery by another process, or this one is exiting);
   * the kernel sees the server gone when the process's files close.
   */
  drop(): void {
    this.dropped = true;
    this.close('dropped');
  }

  fail(e: Error): void {
    this.dropped = true;
    this.close(`I/O worker error: ${e.message}`);
  }

  // ------------------------------------------------------------- the loop

  complete(tag: number, res: number, opId: number): void {
    if (tag === TAG_FETCHED) { this.post({ t: 'ublk-fetched', id: this.id }); return; }
    if (this.closed) return this.settle(tag, res, opId);
    switch (this.st[tag]) {
      case S_CMD: return this.request(tag, res);
      case S_READING: {
        const e = this.io.completeRead(res, opId, this, tag, this.zc?.zero ?? -1);
        if (e === MORE) return;
        if (e && !this.err[tag]) this.err[tag] = e;
        if (--this.pending[tag] > 0) return;
        const ok = !this.err[tag];
        this.io.readDone(this.at[tag], this.len[tag], ok, this.t0[tag]);
        this.stats[UBLK_STAT.FAST]++;
        if (!ok) return this.commitLater(tag, -this.err[tag]);
        if (this.spec.zeroCopy) return this.commitLater(tag, this.len[tag]);
        this.st[tag] = S_COPY_OUT;
        this.todo.push(tag);
        return;
      }
      case S_COPYING: {
        const r = this.moved(tag, res) ? this.len[tag] : this.failure(res);
        return this.spec.zeroCopy ? this.unstage(tag, S_UNSTAGE_R, r) : this.commitLater(tag, r);
      }
      case S_UNSTAGE_R: return this.commitLater(tag, this.res[tag]);
      case S_UNSTAGE_W: this.toSlow(tag, true); return;
      case S_DATA_IN:
        if (!this.moved(tag, res, true)) return this.commitLater(tag, this.failure(res));
        this.st[tag] = S_WRITE;
        this.todo.push(tag);
        return;
      case S_WRITING: {
        const ok = res === this.len[tag];
        this.io.writeEnd(this.at[tag], this.len[tag], ok, this.t0[tag]);
        this.stats[UBLK_STAT.FAST]++;
        return this.commitLater(tag, ok ? this.len[tag] : this.failure(res));
      }
      case S_FILE_OP:
        // A file system that cannot punch holes: the main thread writes zeros.
        if (res === -EOPNOTSUPP) { this.toSlow(tag, false); return; }
        this.stats[UBLK_STAT.FAST]++;
        return this.commitLater(tag, res < 0 ? res : 0);
      case S_STAGE_IN:
        if (res !== this.len[tag]) return this.commitLater(tag, this.failure(res));
        this.st[tag] = S_STAGE_BACK;
        this.todo.push(tag);
        return;
      case S_STAGING_BACK:
        if (!this.moved(tag, res, true)) return this.commitLater(tag, this.failure(res));
        this.unstage(tag, S_UNSTAGE_W, 0);
    }
  }

  /**
   * Zero copy: the tag's range of the staging file has been read; its
   * pages are punched out before the tag moves on (state `next`, with
   * `res` kept for the commit), or the staging file would keep every page
   * a slow request ever passed through it. In order, so the punch never
   * meets the tag's next staged data. Without room in the ring it is left.
   */
  private unstage(tag: number, next: number, res: number): void {
    this.res[tag] = res;
    this.st[tag] = next;
    if (this.loop.room(1)) this.loop.pushFallocate(this, tag, this.zc!.stage, native.FLAG_PUNCH, this.stageAt(tag), this.len[tag]);
    else this.complete(tag, 0, -1);
  }

  pump(): void {
    if (this.closed) return;
    let waiting = false;
    // Three lists swapped, not allocated, per turn: this turn's tags, the
    // ones that must wait (kept first), and what the steps queue meanwhile.
    const todo = this.todo, keep = this.kept;
    this.todo = this.spare;
    for (let i = 0; i < todo.length; i++) {
      const tag = todo[i];
      if (this.dropped) break;
      if (!this.loop.room(this.io.readRoom + 2)) { waiting = true; for (let j = i; j < todo.length; j++) keep.push(todo[j]); break; }
      if (!this.step(tag)) keep.push(tag);
    }
    todo.length = 0;
    const kept = keep.length, added = this.todo.length;
    if (kept) {
      for (let i = 0; i < added; i++) keep.push(this.todo[i]);
      this.todo.length = 0;
      this.kept = this.todo;
      this.todo = keep;
      waiting ||= !this.dropped;
    }
    this.spare = todo;
    // Steps taken here may have queued more (a write served at once commits next).
    if (added && !this.closed) this.loop.touch(this);
    this.loop.wait(this, waiting && !this.closed);
    if (this.toMain.length) {
      const reqs = this.toMain;
      this.toMain = [];
      this.post({ t: 'ublk-requests', id: this.id, reqs });
    }
  }

  /** Moves a tag on; false: it cannot yet (stripes busy, buffer memory short), try again later. */
  private step(tag: number): boolean {
    const loop = this.loop, q = this.spec;
    switch (this.st[tag]) {
      case S_FETCH:
        this.st[tag] = S_CMD;
        loop.pushUblk(this, tag, q.cdev, this.u.fetchReq, q.queue, tag, -1, this.bufReg(tag));
        // The FETCHes go out with this turn's submission; a NOP behind the
        // last completes after it and tells the main thread START_DEV may go.
        if (tag === q.depth - 1) loop.push(this, TAG_FETCHED, NOP, -1, -1, 0, 0, 0);
        return true;
      case S_COMMIT:
        this.st[tag] = S_CMD;
        loop.pushUblk(this, tag, q.cdev, this.u.commitAndFetchReq, q.queue, tag, this.res[tag], this.bufReg(tag));
        return true;
      case S_NEW: return this.start(tag);
      case S_WRITE: return this.writeData(tag);
      case S_COPY_OUT: return this.copyOut(tag);
      case S_STAGE_BACK: {
        const s = this.slot[tag] = loop.slabs.alloc(this.len[tag]);
        if (s < 0) return false;
        this.st[tag] = S_STAGING_BACK;
        loop.push(this, tag, READ, this.zc!.stage, s, 0, this.len[tag], this.stageAt(tag));
        return true;
      }
    }
    return true;
  }

  /** A FETCH or COMMIT_AND_FETCH completed: a new request in the tag's descriptor, or the end of the queue. */
  private request(tag: number, res: number): void {
    if (res !== this.u.resOk) {
      // UBLK_IO_RES_ABORT (-ENODEV): the device is stopping; or a refused command. Never re-fetched.
      this.st[tag] = S_DEAD;
      if (--this.live === 0) this.close(res === -19 ? 'stopped' : `the kernel ended the queue (${res})`);
      return;
    }
    const d = tag * this.u.descSize, v = this.descs;
    const opFlags = v.getUint32(d + this.u.descOpFlags, true);
    this.op[tag] = opFlags & 0xff;
    this.flags[tag] = opFlags;
    this.len[tag] = v.getUint32(d + this.u.descSectors, true) * 512;
    this.at[tag] = Number(v.getBigUint64(d + this.u.descStartSector, true)) * 512;
    this.err[tag] = 0;
    this.slowW[tag] = 0;
    this.st[tag] = S_NEW;
    this.todo.push(tag);
  }

  /** Starts a new request: served here, or on its way to the main thread. */
  private start(tag: number): boolean {
    const op = this.op[tag], offset = this.at[tag], length = this.len[tag], loop = this.loop, io = this.io;
    const fast = !this.spec.alwaysSlow && !(this.flags[tag] & this.u.ioFlagFua) && length > 0 &&
      offset + length <= this.spec.size && (op === UBLK_OP.READ || op === UBLK_OP.WRITE);
    if (op === UBLK_OP.READ && fast) {
      const zc = this.spec.zeroCopy;
      const slot = zc ? -1 : loop.slabs.alloc(length);
      if (!zc && slot < 0) return false;
      const n = io.read(this, tag, offset, length, slot, 0, zc ? this.fixed![tag] : -1, this.zc?.zero ?? -1);
      if (typeof n !== 'number') {
        if (slot >= 0) loop.slabs.release(slot);
        return n === 'busy' ? false : this.toSlow(tag, false);
      }
      this.slot[tag] = slot;
      this.pending[tag] = n;
      this.t0[tag] = loop.now;
      this.st[tag] = S_READING;
      if (n === 0) {
        // Zeros only (user copy: filled in the buffer already).
        io.readDone(offset, length, true, loop.now);
        this.stats[UBLK_STAT.FAST]++;
        return this.copyOut(tag);
      }
      return true;
    }
    if (op === UBLK_OP.WRITE && length > 0) {
      this.slowW[tag] = fast ? 0 : 1;
      if (this.spec.zeroCopy) {
        if (fast) {
          const fd = io.writeStart(this, offset, length);
          if (fd === 'busy') return false;
          if (fd !== 'slow') {
            this.t0[tag] = loop.now;
            this.st[tag] = S_WRITING;
            loop.pushFixed(this, tag, WRITE, fd, this.fixed![tag], 0, length, offset);
            return true;
          }
          this.slowW[tag] = 1;
        }
        // Its data to the main thread: request -> staging file -> buffer.
        this.st[tag] = S_STAGE_IN;
        loop.pushFixed(this, tag, WRITE, this.zc!.stage, this.fixed![tag], 0, length, this.stageAt(tag));
        return true;
      }
      const slot = loop.slabs.alloc(length);
      if (slot < 0) return false;
      this.slot[tag] = slot;
      this.st[tag] = S_DATA_IN;
      loop.push(this, tag, READ, this.spec.cdev, slot, 0, length, this.pos(tag));
      return true;
    }
    if (this.fileOp(tag, op, offset, length)) { this.st[tag] = S_FILE_OP; return true; }
    return this.toSlow(tag, false);
  }

  /** FLUSH, DISCARD and WRITE_ZEROES the placement does on this ring (a FileTarget's), else false. */
  private fileOp(tag: number, op: number, offset: number, length: number): boolean {
    if (this.spec.alwaysSlow) return false;
    if (op === UBLK_OP.FLUSH) return this.io.flush(this, tag);
    if (op !== UBLK_OP.DISCARD && op !== UBLK_OP.WRITE_ZEROES) return false;
    return length > 0 && offset + length <= this.spec.size && this.io.discard(this, tag, offset, length);
  }

  /** User copy: a WRITE's data is in its buffer: written here (BlockIo.write), or to the main thread. */
  private writeData(tag: number): boolean {
    if (!this.slowW[tag]) {
      const res = this.io.write(this, this.at[tag], this.len[tag], this.slot[tag], 0);
      if (res === 'busy') return false;
      if (res !== 'slow') {
        this.stats[UBLK_STAT.FAST]++;
        this.release(tag);
        this.commitLater(tag, res >= 0 ? this.len[tag] : res);
        return true;
      }
    }
    return this.toSlow(tag, true);
  }

  /** READ data to the request: a buffer's (served here or answered) or a staged answer's. */
  private copyOut(tag: number): boolean {
    const loop = this.loop, len = this.len[tag];
    const data = this.answers[tag];
    if (data) {
      const s = loop.slabs.alloc(len);
      if (s < 0) return false;
      this.answers[tag] = null;
      const b = loop.slabs.buf(s), o = off(s);
      b.set(data.subarray(0, len), o);
      if (data.length < len) b.fill(0, o + data.length, o + len); // a short answer: zeros
      this.slot[tag] = s;
      if (this.spec.zeroCopy) {
        const w = loop.pwrite(s, 0, len, this.zc!.stage, this.stageAt(tag));
        this.release(tag);
        if (w !== len) { this.commitLater(tag, this.failure(w)); return true; }
        this.st[tag] = S_COPYING;
        loop.pushFixed(this, tag, READ, this.zc!.stage, this.fixed![tag], 0, len, this.stageAt(tag));
        return true;
      }
    }
    this.st[tag] = S_COPYING;
    loop.push(this, tag, WRITE, this.spec.cdev, this.slot[tag], 0, len, this.pos(tag));
    return true;
  }

  /** To the main thread, with a WRITE's data from the tag's buffer when `data`. */
  private toSlow(tag: number, data: boolean): boolean {
    let bytes: Uint8Array | null = null;
    if (data) {
      const s = this.slot[tag], b = this.loop.slabs.buf(s);
      bytes = Uint8Array.prototype.slice.call(b, off(s), off(s) + this.len[tag]);
      this.release(tag);
    }
    this.st[tag] = S_SLOW;
    this.stats[UBLK_STAT.SLOW]++;
    // READs and WRITEs it could not place (FUA writes are the engine's by rule).
    if ((this.op[tag] === UBLK_OP.READ || this.op[tag] === UBLK_OP.WRITE) && !(this.flags[tag] & this.u.ioFlagFua)) this.stats[UBLK_STAT.SLOW_RW]++;
    this.toMain.push({ tag, op: this.op[tag], flags: this.flags[tag], offset: this.at[tag], length: this.len[tag], data: bytes });
    return true;
  }

  private commitLater(tag: number, res: number): void {
    this.release(tag);
    this.res[tag] = res;
    this.st[tag] = S_COMMIT;
    this.todo.push(tag);
  }

  /** A data move finished: whether all of it moved (a partial move is a failure). */
  private moved(tag: number, res: number, keepSlot = false): boolean {
    if (!keepSlot || res !== this.len[tag]) this.release(tag);
    return res === this.len[tag];
  }

  private failure(res: number): number { return res < 0 ? res : -5; /* EIO: a short transfer */ }

  private release(tag: number): void {
    const s = this.slot[tag];
    if (s >= 0) { this.loop.slabs.release(s); this.slot[tag] = -1; }
  }

  /** Zero copy: the request's slot in the ring's sparse table (AUTO_BUF_REG's index), else 0. */
  private bufReg(tag: number): number { return this.fixed ? this.fixed[tag] : 0; }
  /** User copy: the request's position on /dev/ublkcN. */
  private pos(tag: number): number { return this.u.userCopyBase + this.spec.queue * this.u.userCopyQueueStride + tag * this.u.userCopyTagStride; }
  /** Zero copy: the tag's place in the staging file (slots of the sparse table never overlap). */
  private stageAt(tag: number): number { return this.fixed![tag] * this.spec.maxIo; }

  /**
   * After close: what a data move still in flight holds (its stripes, its
   * buffer) is given back as it lands; the device's gate once none is left.
   */
  private settle(tag: number, res: number, opId: number): void {
    const st = this.st[tag];
    if (st === S_READING) {
      if (this.io.completeRead(res, opId, this, tag, this.zc?.zero ?? -1) === MORE) return;
      if (--this.pending[tag] === 0) { this.io.readDone(this.at[tag], this.len[tag], false, this.t0[tag]); this.st[tag] = S_DEAD; }
    } else if (st === S_WRITING) {
      this.io.writeEnd(this.at[tag], this.len[tag], res === this.len[tag], this.t0[tag]);
      this.st[tag] = S_DEAD;
    } else if (st !== S_CMD) this.st[tag] = S_DEAD;
    this.release(tag);
    this.closeIo();
  }

  private closeIo(): void {
    if (this.ioClosed || this.st.some((s) => s === S_READING || s === S_WRITING)) return;
    this.ioClosed = true;
    this.io.close();
  }
  private ioClosed = false;

  private close(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    this.loop.wait(this, false);
    for (let t = 0; t < this.spec.depth; t++) {
      const st = this.st[t];
      // Buffers a move in flight still uses are given back as it lands (settle).
      if (st !== S_READING && st !== S_WRITING && st !== S_DATA_IN && st !== S_STAGE_IN && st !== S_STAGING_BACK && st !== S_COPYING) this.release(t);
    }
    this.closeIo();
    // Slots still registered (tags the kernel holds) are unregistered at commit or teardown; a dropped queue's stay taken.
    if (this.fixed && !this.dropped) this.loop.giveFixed(this.fixed);
    this.post({ t: 'closed', id: this.id, reason, slotsKept: this.dropped });
  }
}
