// The loop of one I/O worker: one io_uring ring serving many channels (NBD
// connections, ublk queues), on the worker's own thread. It waits in the ring,
// hands each completion to the channel that submitted it, lets the channels
// that changed move on (parse, plan, submit), and submits their operations
// in one call. Other threads reach the worker through a MessagePort and an
// eventfd the ring reads: a message is followed by 8 bytes on the eventfd,
// which completes that read and wakes the wait.
import * as fs from 'fs';
import { receiveMessageOnPort, type MessagePort } from 'worker_threads';
import { loadNative, CQ_ENTRY, FLAG_RAW_FIXED, OP, SQ_ENTRY, type NativeRing } from '../native';
import { chunkOf, offsetOf, Slabs } from './slabs';

export interface Channel {
  /** One operation it submitted finished: res is bytes or -errno. */
  complete(tag: number, res: number, op: number): void;
  /** Something changed (completions, messages): parse, plan and submit what it can. */
  pump(): void;
  /** One of its calls threw: it must close (the loop and its other channels go on). */
  fail(e: Error): void;
}

// Submission entries; the completion queue has 4x, which bounds the operations in flight (capacity).
const ENTRIES = 4096;
/**
 * Slots of each worker ring's sparse buffer table for ublk zero copy
 * (AUTO_BUF_REG registers each request's pages in one): one per tag of its
 * zero-copy queues. io_uring allows at most 16384.
 */
export const FIXED_SLOTS = 16384;
const TWO_32 = 0x1_0000_0000;

export class IoLoop {
  readonly slabs: Slabs;
  private readonly ring: NativeRing;
  private readonly sq: DataView;
  private readonly cq: DataView;
  private readonly cap: number;
  /** Operations that may be in flight at once (every fetched ublk tag is one). */
  get capacity(): number { return this.cap; }
  private head = 0;
  private submitted = 0;
  // Operations in flight, by id (the completion's user data).
  private opOwner: Array<Channel | null>;
  private opTag: Int32Array;
  /** The buffer position and length of each operation (short reads, partial sends). */
  readonly opPos: Float64Array;
  readonly opLen: Uint32Array;
  // The fixed slot of each operation on one (pushFixed), else -1.
  private opFixed: Int32Array;
  private freeIds: number[] = [];
  private dirty = new Set<Channel>();
  private waiting = new Set<Channel>();
  private retrying = new Set<Channel>();
  private wakeSlot: number;
  private stopping = false;
  /** performance.now() of this turn: one clock read per turn, not per request. */
  now = performance.now();

  /**
   * `halt` (shared with the process's main thread) is set, followed by a
   * wake-up, when the process exits: the loop then returns instead of
   * waiting again, since a thread blocked in the ring cannot be terminated
   * and would hold the exit forever.
   */
  constructor(private readonly port: MessagePort, private readonly wakeFd: number,
    private readonly onMessage: (m: unknown) => void, maxChunks = 16, private readonly halt?: Int32Array) {
    const native = loadNative();
    const sqBuf = new SharedArrayBuffer(ENTRIES * 4 * SQ_ENTRY), cqBuf = new SharedArrayBuffer(ENTRIES * 4 * CQ_ENTRY);
    this.ring = new native.Ring(ENTRIES, sqBuf, cqBuf);
    this.sq = new DataView(sqBuf);
    this.cq = new DataView(cqBuf);
    this.cap = Math.min(ENTRIES * 4, this.ring.maxInflight);
    this.opOwner = new Array(this.cap).fill(null);
    this.opTag = new Int32Array(this.cap);
    this.opPos = new Float64Array(this.cap);
    this.opLen = new Uint32Array(this.cap);
    this.opFixed = new Int32Array(this.cap);
    for (let i = this.cap - 1; i >= 0; i--) this.freeIds.push(i);
    this.slabs = new Slabs(maxChunks, (ab) => this.ring.addRegion(ab, 0, ab.byteLength));
    this.wakeSlot = this.slabs.alloc(8);
    this.armWake();
  }

  /** Whether n more operations fit in the ring now. */
  room(n: number): boolean { return this.freeIds.length >= n; }

  /**
   * Queues one operation on buffer `slot` + `at` (slot -1: none, e.g. fsync);
   * submitted at the end of this turn. The caller checked room().
   */
  push(owner: Channel | null, tag: number, op: number, fd: number, slot: number, at: number, len: number, fileOffset: number): number {
    const s = slot >= 0;
    return this.queue(owner, tag, s ? slot + at : 0, op, 0, s ? chunkOf(slot) : 0, fd, len, s ? offsetOf(slot) + at : 0, fileOffset);
  }

  /** Queues a FALLOCATE of [fileOffset, fileOffset+len) of fd; `mode`: FLAG_PUNCH or FLAG_ZERO_RANGE (both keep the size). */
  pushFallocate(owner: Channel, tag: number, fd: number, mode: number, fileOffset: number, len: number): number {
    return this.queue(owner, tag, 0, OP.FALLOCATE, mode, 0, fd, 0, len, fileOffset);
  }

  /**
   * Queues a ublk I/O command (FETCH_REQ, COMMIT_AND_FETCH_REQ) for `queue`
   * and `ublkTag` on the char device `fd`; `result` is the request's
   * (COMMIT), `autoBufReg` zero copy's buffer registration (0: user copy).
   * The completion comes to owner.complete(tag, res, id) as any other.
   */
  pushUblk(owner: Channel, tag: number, fd: number, cmd: number, queue: number, ublkTag: number, result: number, autoBufReg = 0): number {
    // The descriptor's fields as the ring's UBLK_CMD reads them (native/strata_native.cc).
    return this.queue(owner, tag, 0, OP.UBLK_CMD, 0, ublkTag, fd, cmd >>> 0, (result >>> 0) + autoBufReg * TWO_32, queue);
  }

  /**
   * Gives the ring n empty fixed-buffer slots (for ublk zero copy's
   * AUTO_BUF_REG), before anything was submitted; 0 or -errno. takeFixed()
   * then deals them out.
   */
  sparseBuffers(n: number): number {
    const r = this.ring.sparseBuffers(n);
    if (r === 0) for (let i = n - 1; i >= 0; i--) this.fixedFree.push(i);
    return r;
  }

  // Free slots of the sparse table. Any slot serves any tag: no runs to keep.
  private fixedFree: number[] = [];

  /** n slots of the sparse table, or null (fewer left, or no table). */
  takeFixed(n: number): Int32Array | null {
    if (this.fixedFree.length < n) return null;
    return Int32Array.from(this.fixedFree.splice(this.fixedFree.length - n, n));
  }

  /** Gives back takeFixed()'s slots (their buffers are gone: the kernel unregisters them at each commit). */
  giveFixed(slots: Int32Array): void { for (const i of slots) this.fixedFree.push(i); }

  /**
   * Queues a READ or WRITE of len bytes between fd at fileOffset and the
   * buffer in fixed slot `index` (sparseBuffers) at bufOffset: a ublk
   * request's own pages under zero copy.
   */
  pushFixed(owner: Channel, tag: number, op: number, fd: number, index: number, bufOffset: number, len: number, fileOffset: number): number {
    const id = this.queue(owner, tag, bufOffset, op, FLAG_RAW_FIXED, index, fd, len, bufOffset, fileOffset);
    this.opFixed[id] = index;
    return id;
  }

  /** The fixed slot an operation in flight moves data to or from (pushFixed), or -1; its offset there is opPos. */
  fixedIndex(id: number): number { return this.opFixed[id]; }

  /** Takes an operation id for owner's `tag` and writes its descriptor (layout: native/strata_native.cc, Desc). */
  private queue(owner: Channel | null, tag: number, pos: number, op: number, flags: number, bufIndex: number, fd: number,
    len: number, bufOffset: number, fileOffset: number): number {
    const id = this.freeIds.pop();
    if (id === undefined) throw new Error('io loop: no room for another operation (call room() first)');
    this.opOwner[id] = owner;
    this.opTag[id] = tag;
    this.opPos[id] = pos;
    this.opLen[id] = len;
    this.opFixed[id] = -1;
    const o = (this.head % this.cap) * SQ_ENTRY, v = this.sq;
    v.setUint8(o, op);
    v.setUint8(o + 1, flags);
    v.setUint16(o + 2, bufIndex, true);
    v.setInt32(o + 4, fd, true);
    v.setUint32(o + 8, len, true);
    v.setUint32(o + 12, id, true);
    v.setUint32(o + 16, bufOffset >>> 0, true);
    v.setUint32(o + 20, Math.floor(bufOffset / TWO_32), true);
    v.setUint32(o + 24, fileOffset >>> 0, true);
    v.setUint32(o + 28, Math.floor(fileOffset / TWO_32), true);
    this.head++;
    return id;
  }

  /** Writes len bytes at slot + at to fd at fileOffset now, on this thread: bytes written or -errno. */
  pwrite(slot: number, at: number, len: number, fd: number, fileOffset: number): number {
    return this.ring.pwrite(chunkOf(slot), offsetOf(slot) + at, len, fd, fileOffset);
  }

  /** Pump this channel at the end of the turn. */
  touch(c: Channel): void { this.dirty.add(c); }

  /** Pump this channel after every turn until it says otherwise (it waits for room). */
  wait(c: Channel, on: boolean): void { if (on) this.waiting.add(c); else this.waiting.delete(c); }

  /**
   * Pump this channel next turn without sleeping in the ring first: it waits
   * for something no completion here announces (stripes another thread
   * holds). The channel bounds such waits (a few turns, then the slow path).
   */
  retry(c: Channel): void { this.retrying.add(c); }

  /** Ends run() once `idle` says every channel is gone. */
  stop(): void { this.stopping = true; }

  /** Runs until stop() and idle() (no channel left). */
  run(idle: () => boolean): void {
    for (;;) {
      for (const c of this.waiting) this.dirty.add(c);
      for (const c of this.retrying) this.dirty.add(c);
      this.retrying.clear();
      while (this.dirty.size) {
        const batch = [...this.dirty];
        this.dirty.clear();
        for (const c of batch) this.guard(c, () => c.pump());
      }
      if ((this.stopping && idle()) || (this.halt && Atomics.load(this.halt, 0))) break;
      const count = this.head - this.submitted;
      let n = this.ring.submitReap(this.submitted, count);
      this.submitted = this.head;
      if (n === 0 && !this.retrying.size) n = this.ring.wait(1);
      this.now = performance.now();
      this.dispatch(n);
    }
    this.ring.close();
  }

  private dispatch(n: number): void {
    const cq = this.cq;
    for (let i = 0; i < n; i++) {
      const id = cq.getUint32(i * CQ_ENTRY, true), res = cq.getInt32(i * CQ_ENTRY + 4, true);
      const owner = this.opOwner[id], tag = this.opTag[id];
      this.opOwner[id] = null;
      if (owner) {
        this.guard(owner, () => owner.complete(tag, res, id));
        this.dirty.add(owner);
      } else this.onWake();
      this.freeIds.push(id);
    }
  }

  /** Runs a channel's code; an exception closes that channel only. */
  guard(c: Channel, fn: () => void): void {
    try { fn(); } catch (e) {
      try { c.fail(e as Error); } catch { /* it is closing anyway */ }
    }
  }

  private armWake(): void { this.push(null, 0, OP.READ, this.wakeFd, this.wakeSlot, 0, 8, 0); }

  private onWake(): void {
    for (let m = receiveMessageOnPort(this.port); m; m = receiveMessageOnPort(this.port)) this.onMessage(m.message);
    this.armWake();
  }
}

/** Wakes a worker's loop (another thread): 8 bytes on its eventfd. */
export function wake(fd: number): void { fs.writeSync(fd, ONE); }
const ONE = Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]);
