// The NBD transmission phase of one connection, run by an I/O worker's loop
// (src/io/loop.ts) after JavaScript on the main thread negotiated it
// (connection.ts). The worker receives requests through its ring, serves
// each READ and WRITE the device's view can place right here — planned by
// the WASM planner (assembly/plan.ts) over the engine's shared tables, the
// device's gate and stripes held through its native target — and hands
// everything else (cold data, copy-on-write, FLUSH, TRIM, WRITE_ZEROES,
// CACHE, BLOCK_STATUS, FUA, errors) to the connection on the main thread,
// whose complete replies come back through the worker's port. Replies are
// queued whole, so they never interleave. Memory is bounded: the worker
// stops receiving while too many requests or reply bytes are pending.
import { loadNative, OP, type NativeDeviceTarget } from '../native';
import type { WasmExports } from '../wasm';
import type { Channel, IoLoop } from '../io/loop';
import { offsetOf as off } from '../io/slabs';
import {
  CMD, CMD_FLAG, ERR, errorChunk, nbdError, putReadReplyHeader, putSimpleReply, readReplyHeaderLen,
  REQUEST_LEN, REQUEST_MAGIC,
} from './protocol';

export interface TransmissionOptions {
  structured: boolean; readOnly: boolean; size: number; minBlock: number; maxPayload: number;
  maxInflight: number; maxInflightBytes: number; maxQueuedReplyBytes: number;
}

/** A request the worker hands to the main thread. */
export interface SlowRequest { type: number; flags: number; cookie: Uint8Array; offset: number; length: number; payload: Uint8Array | null }

/** What a worker posts about a connection. */
export type TransmissionEvent =
  | { t: 'requests'; id: number; reqs: SlowRequest[] }
  | { t: 'closed'; id: number; reason: string };

/** Counters the main thread reads without a message (a Float64Array over a SharedArrayBuffer). */
export const STAT = { FAST: 0, SLOW: 1, PENDING_SLOW: 2, PHASE: 3, UNSENT: 4, LENGTH: 5 } as const;

/** The worker's planner: WASM over the engine's memory, with room for segments. */
export interface Planner { wasm: WasmExports; memory: WebAssembly.Memory; segs: number; segCap: number; blockSize: number }

const RECV_BUF = 128 * 1024;
const STAGE = 256 * 1024;
// Replies at least this large are sent from their own buffer; smaller ones
// are copied together into a staging buffer and go out in one send.
const SEND_ALONE = 64 * 1024;
const PIECE = 8 << 20;
const TAG_RECV = -1, TAG_SEND = -2;
const SEG_KIND = 0, SEG_REF = 4, SEG_OFF = 8, SEG_LEN = 16, SEG_DST = 20, SEG_SIZE = 24, SEG_ZERO = 2;

/** A READ or WRITE served by the worker, from acquire to reply. */
interface Fast {
  write: boolean; offset: number; length: number; view: number; fd: number;
  slot: number; hdr: number; pending: number; errno: number; t0: number;
  cookie: Buffer; // 8 bytes
}

type Verdict = 'served' | 'slow' | 'wait';

export class Transmission implements Channel {
  private fd: number;
  private recvSlot: number;
  private rpos = 0;
  private rlen = 0;
  private receiving = false;
  private sending = false;
  private reading = true;
  private peerGone = false;
  private destroyed = false;
  private shutting = false;
  private why = '';
  private closed = false;
  // A WRITE whose payload is still arriving, straight into its own slot.
  private payload: { type: number; flags: number; cookie: Buffer; offset: number; length: number; slot: number; got: number } | null = null;
  // Replies: queued buffers [slot, length, sent], then the staging buffer being filled.
  private out: Array<{ slot: number; len: number; sent: number }> = [];
  private stage = -1;
  private stageLen = 0;
  private unsent = 0;
  private fast = new Map<number, Fast>();
  private nextTag = 0;
  private fastN = 0;
  private slowN = 0;
  private inflightBytes = 0;
  private toMain: SlowRequest[] = [];

  constructor(readonly id: number, fd: number, private readonly loop: IoLoop, private readonly target: NativeDeviceTarget,
    private readonly plan: Planner, private readonly opts: TransmissionOptions, initial: Uint8Array,
    private readonly stats: Float64Array, private readonly post: (e: TransmissionEvent) => void) {
    this.fd = fd;
    this.recvSlot = this.mustAlloc(Math.max(RECV_BUF, initial.length));
    const b = loop.slabs.buf(this.recvSlot);
    b.set(initial, off(this.recvSlot));
    this.rlen = initial.length;
    this.recvCap = Math.max(RECV_BUF, initial.length);
    loop.touch(this);
  }
  private recvCap: number;

  /** Main thread: complete replies of slow requests, and how many finished (count, bytes). */
  reply(bytes: Uint8Array | null, done: number, doneBytes: number): void {
    this.slowN -= done;
    this.inflightBytes -= doneBytes;
    if (bytes && bytes.length && !this.peerGone && !this.destroyed) this.queueBytes(bytes);
    this.loop.touch(this);
  }

  /** Main thread: stop reading, finish what is in flight, send every reply, close. */
  shutdown(): void { this.shutting = true; this.reading = false; this.loop.touch(this); }

  /** The loop caught an exception of this channel's: it is closed at once (never left half-served). */
  fail(e: Error): void {
    this.why ||= `I/O worker error: ${e.message}`;
    this.destroy();
  }

  /** Main thread: close now; replies not yet sent are dropped. */
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    this.why ||= 'destroyed';
    this.shutdownSocket();
    this.loop.touch(this);
  }

  // ------------------------------------------------------------ the loop

  complete(tag: number, res: number, op: number): void {
    if (tag === TAG_RECV) return this.received(res);
    if (tag === TAG_SEND) return this.sent(res);
    const f = this.fast.get(tag);
    if (!f) return;
    const want = this.loop.opLen[op];
    if (res < 0) f.errno ||= -res;
    else if (res < want) {
      const at = this.loop.opPos[op] + res;
      if (f.write) {
        // A short write: the rest goes again from where it stopped.
        if (!f.errno) {
          const fileOff = f.offset + (at - f.slot);
          this.loop.push(this, tag, OP.WRITE, f.fd, f.slot, at - f.slot, want - res, fileOff);
          return;
        }
      } else this.loop.slabs.buf(f.slot).fill(0, off(at), off(at) + want - res); // past the file's end: zeros
    }
    if (--f.pending === 0) this.finish(tag, f);
  }

  pump(): void {
    if (this.closed) return;
    const p = this.payload;
    if (p && p.got === p.length && !this.destroyed && !this.peerGone) this.loop.wait(this, this.writeArrived() === 'wait');
    if (!this.destroyed && !this.peerGone && this.reading && !this.payload) this.parse();
    this.postToMain();
    this.kick();
    this.maybeClose();
    const s = this.stats;
    s[STAT.PENDING_SLOW] = this.slowN;
    s[STAT.UNSENT] = this.unsent;
    s[STAT.PHASE] = this.peerGone || this.destroyed ? 2 : this.reading ? 0 : 1;
  }

  private paused(): boolean {
    const o = this.opts;
    return this.fastN + this.slowN >= o.maxInflight || this.inflightBytes >= o.maxInflightBytes ||
      this.unsent + this.inflightBytes > o.maxQueuedReplyBytes;
  }

  private parse(): void {
    const b = this.loop.slabs.buf(this.recvSlot), base = off(this.recvSlot);
    let waiting = false;
    while (this.rlen - this.rpos >= REQUEST_LEN && !this.paused() && this.reading) {
      const h = base + this.rpos;
      if (b.readUInt32BE(h) !== REQUEST_MAGIC) { this.gone('bad request magic'); return; }
      const flags = b.readUInt16BE(h + 4), type = b.readUInt16BE(h + 6);
      const offset = b.readUInt32BE(h + 16) * 0x100000000 + b.readUInt32BE(h + 20), length = b.readUInt32BE(h + 24);
      if (type === CMD.DISC) { this.rpos += REQUEST_LEN; this.reading = false; break; }
      if (type === CMD.WRITE) {
        if (length > this.opts.maxPayload) { this.gone(`write of ${length} bytes exceeds the maximum payload`); return; }
        // The payload goes to a slot of its own (it outlives the receive buffer).
        const slot = this.loop.slabs.alloc(Math.max(length, 1));
        if (slot < 0) { waiting = true; break; }
        const have = Math.min(length, this.rlen - this.rpos - REQUEST_LEN);
        b.copy(this.loop.slabs.buf(slot), off(slot), h + REQUEST_LEN, h + REQUEST_LEN + have);
        const cookie = Buffer.from(b.subarray(h + 8, h + 16));
        this.rpos += REQUEST_LEN + have;
        this.payload = { type, flags, cookie, offset, length, slot, got: have };
        if (have < length) break; // the rest arrives straight into the slot
        if (this.writeArrived() === 'wait') { waiting = true; break; }
        continue;
      }
      const cookie = b.subarray(h + 8, h + 16);
      const v = type === CMD.READ ? this.serveRead(flags, cookie, offset, length) : 'slow';
      if (v === 'wait') { waiting = true; break; }
      if (v === 'slow') this.slow(type, flags, cookie, offset, length, null);
      this.rpos += REQUEST_LEN;
    }
    if (this.rpos === this.rlen) this.rpos = this.rlen = 0;
    this.loop.wait(this, waiting);
  }

  /** A WRITE's payload is all in its slot: serve it or hand it over. */
  private writeArrived(): Verdict {
    const p = this.payload!;
    const v = this.serveWrite(p.flags, p.cookie, p.offset, p.length, p.slot);
    if (v === 'wait') return v;
    this.payload = null;
    if (v === 'slow') {
      const b = this.loop.slabs.buf(p.slot);
      this.slow(p.type, p.flags, p.cookie, p.offset, p.length, Uint8Array.prototype.slice.call(b, off(p.slot), off(p.slot) + p.length));
      this.loop.slabs.release(p.slot);
    }
    return v;
  }

  /** A READ/WRITE range the planner may place: non-empty, aligned, inside the device. */
  private plannable(offset: number, length: number): boolean {
    const o = this.opts;
    return length > 0 && length <= o.maxPayload && offset % o.minBlock === 0 && length % o.minBlock === 0 &&
      offset + length <= o.size;
  }

  private serveRead(flags: number, cookie: Buffer, offset: number, length: number): Verdict {
    if ((flags & ~CMD_FLAG.DF) || !this.plannable(offset, length)) return 'slow';
    const { wasm, segs, segCap, blockSize: bs } = this.plan;
    if (!this.loop.room(segCap)) return 'wait';
    const hdr = readReplyHeaderLen(this.opts.structured);
    const slot = this.loop.slabs.alloc(hdr + length);
    if (slot < 0) return 'wait';
    const t0 = performance.now();
    const view = this.target.acquire(false, offset, length);
    if (!view) { this.loop.slabs.release(slot); return 'slow'; }
    const b0 = Math.floor(offset / bs), b1 = Math.ceil((offset + length) / bs);
    const n = wasm.planLocal(view, b0, b1, bs, segs, segCap);
    if (n < 0) {
      this.target.release(false, offset, length, -1, 0);
      this.loop.slabs.release(slot);
      return 'slow';
    }
    const buf = this.loop.slabs.buf(slot), so = off(slot);
    putReadReplyHeader(buf, so, this.opts.structured, cookie, 0, offset, length);
    const tag = this.tag();
    const f: Fast = { write: false, offset, length, view, fd: -1, slot, hdr, pending: 1, errno: 0, t0, cookie: Buffer.from(cookie) };
    this.fast.set(tag, f);
    this.fastN++;
    this.inflightBytes += length;
    const m = this.mem(), head = offset - b0 * bs;
    for (let i = 0; i < n; i++) {
      const s = segs + i * SEG_SIZE;
      const dst = m.getUint32(s + SEG_DST, true), len = m.getUint32(s + SEG_LEN, true);
      const a = Math.max(dst, head), e = Math.min(dst + len, head + length);
      if (a >= e) continue;
      const at = hdr + (a - head);
      if (m.getUint32(s + SEG_KIND, true) === SEG_ZERO) { buf.fill(0, so + at, so + at + (e - a)); continue; }
      const fileOff = m.getUint32(s + SEG_OFF, true) + m.getUint32(s + SEG_OFF + 4, true) * 0x100000000 + (a - dst);
      this.loop.push(this, tag, OP.READ, m.getInt32(s + SEG_REF, true), slot, at, e - a, fileOff);
      f.pending++;
    }
    if (--f.pending === 0) this.finish(tag, f);
    return 'served';
  }

  private serveWrite(flags: number, cookie: Buffer, offset: number, length: number, slot: number): Verdict {
    if (process.env.DBGW) console.error('serveWrite', flags, offset, length, this.opts.readOnly, this.plannable(offset, length));
    if (flags !== 0 || this.opts.readOnly || !this.plannable(offset, length)) return 'slow';
    if (!this.loop.room(1)) return 'wait';
    const t0 = performance.now();
    const view = this.target.acquire(true, offset, length);
    if (!view) return 'slow';
    const fd = this.plan.wasm.planWrite(view, offset, length, this.plan.blockSize);
    if (fd < 0) { this.target.release(true, offset, length, -1, 0); return 'slow'; }
    const tag = this.tag();
    const f: Fast = { write: true, offset, length, view, fd, slot, hdr: 0, pending: 1, errno: 0, t0, cookie };
    this.fast.set(tag, f);
    this.fastN++;
    this.inflightBytes += length;
    this.loop.push(this, tag, OP.WRITE, fd, slot, 0, length, offset);
    return 'served';
  }

  private finish(tag: number, f: Fast): void {
    this.fast.delete(tag);
    this.fastN--;
    this.inflightBytes -= f.length;
    this.stats[STAT.FAST]++;
    // The write rule: its blocks are DIRTY only once the bytes are in the file.
    if (f.write && !f.errno) this.plan.wasm.wrote(f.view, f.offset, f.length, this.plan.blockSize);
    this.target.release(f.write, f.offset, f.length, f.errno ? 0 : 1, (performance.now() - f.t0) * 1e6);
    if (this.peerGone || this.destroyed) { this.loop.slabs.release(f.slot); return; }
    if (f.write) {
      this.loop.slabs.release(f.slot);
      const r = Buffer.allocUnsafe(16);
      putSimpleReply(r, 0, f.errno ? nbdError(f.errno) : 0, f.cookie, 0);
      this.queueBytes(r);
    } else if (f.errno) {
      this.loop.slabs.release(f.slot);
      this.queueBytes(this.opts.structured ? errorChunk(f.cookie, ERR.EIO, 'I/O error reading the device') : errSimple(f.cookie));
    } else this.queueSlot(f.slot, f.hdr + f.length);
  }

  private slow(type: number, flags: number, cookie: Uint8Array, offset: number, length: number, payload: Uint8Array | null): void {
    this.toMain.push({ type, flags, cookie: Uint8Array.prototype.slice.call(cookie, 0, 8), offset, length, payload });
    this.slowN++;
    this.inflightBytes += type === CMD.WRITE ? length : type === CMD.READ ? Math.min(length, this.opts.maxPayload) : 0;
    this.stats[STAT.SLOW]++;
  }

  private postToMain(): void {
    if (!this.toMain.length) return;
    const reqs = this.toMain;
    this.toMain = [];
    this.post({ t: 'requests', id: this.id, reqs });
  }

  private mv: DataView | null = null;
  /** The shared memory, seen anew after it grew. */
  private mem(): DataView {
    const buf = this.plan.memory.buffer;
    if (!this.mv || this.mv.byteLength !== buf.byteLength) this.mv = new DataView(buf);
    return this.mv;
  }

  private tag(): number {
    do this.nextTag = (this.nextTag + 1) & 0x3fffffff; while (this.fast.has(this.nextTag));
    return this.nextTag;
  }

  // --------------------------------------------------------------- replies

  private queueBytes(bytes: Uint8Array): void {
    if (this.peerGone || this.destroyed) return;
    if (bytes.length > PIECE) {
      // A batch of replies from the main thread: queued in order, in pieces.
      for (let at = 0; at < bytes.length; at += PIECE) this.queueBytes(bytes.subarray(at, Math.min(bytes.length, at + PIECE)));
      return;
    }
    if (bytes.length >= SEND_ALONE) {
      const slot = this.replyAlloc(bytes.length);
      if (slot < 0) return;
      this.loop.slabs.buf(slot).set(bytes, off(slot));
      this.queueSlot(slot, bytes.length);
      return;
    }
    if (this.stage >= 0 && this.stageLen + bytes.length > STAGE) this.seal();
    if (this.stage < 0) {
      this.stage = this.replyAlloc(STAGE);
      this.stageLen = 0;
      if (this.stage < 0) return;
    }
    this.loop.slabs.buf(this.stage).set(bytes, off(this.stage) + this.stageLen);
    this.stageLen += bytes.length;
    this.unsent += bytes.length;
  }

  /** A reply already in a slot: large ones go out from it, small ones are copied to the staging buffer. */
  private queueSlot(slot: number, len: number): void {
    if (len < SEND_ALONE) {
      const b = this.loop.slabs.buf(slot);
      this.queueBytes(b.subarray(off(slot), off(slot) + len));
      this.loop.slabs.release(slot);
      return;
    }
    this.seal();
    this.out.push({ slot, len, sent: 0 });
    this.unsent += len;
  }

  private seal(): void {
    if (this.stage < 0) return;
    if (this.stageLen) this.out.push({ slot: this.stage, len: this.stageLen, sent: 0 });
    else this.loop.slabs.release(this.stage);
    this.stage = -1;
    this.stageLen = 0;
  }

  /** Posts the next receive and the next send. */
  private kick(): void {
    if (this.peerGone || this.destroyed) return;
    if (!this.sending) {
      if (!this.out.length) this.seal();
      const o = this.out[0];
      if (o && this.loop.room(1)) {
        this.loop.push(this, TAG_SEND, OP.SEND, this.fd, o.slot, o.sent, o.len - o.sent, 0);
        this.sending = true;
      }
    }
    if (!this.receiving && this.reading && !this.paused() && this.loop.room(1)) {
      const p = this.payload;
      if (p) {
        this.loop.push(this, TAG_RECV, OP.RECV, this.fd, p.slot, p.got, p.length - p.got, 0);
      } else {
        if (this.rpos > 0) {
          const b = this.loop.slabs.buf(this.recvSlot), base = off(this.recvSlot);
          b.copy(b, base, base + this.rpos, base + this.rlen);
          this.rlen -= this.rpos;
          this.rpos = 0;
        }
        this.loop.push(this, TAG_RECV, OP.RECV, this.fd, this.recvSlot, this.rlen, this.recvCap - this.rlen, 0);
      }
      this.receiving = true;
    }
  }

  private received(res: number): void {
    this.receiving = false;
    if (res <= 0) { this.gone(res === 0 ? 'client went away' : `receive failed: errno ${-res}`); return; }
    const p = this.payload;
    if (!p) { this.rlen += res; return; }
    p.got += res; // pump() serves it once it is complete
  }

  private sent(res: number): void {
    this.sending = false;
    if (res < 0) { this.gone(`send failed: errno ${-res}`); return; }
    const o = this.out[0];
    if (!o) return;
    o.sent += res;
    this.unsent -= res;
    if (o.sent === o.len) { this.out.shift(); this.loop.slabs.release(o.slot); }
  }

  private gone(why: string): void {
    this.why ||= why;
    this.peerGone = true;
    this.reading = false;
    this.shutdownSocket();
  }

  private shutdownSocket(): void {
    try { loadNative().shutdownSocket(this.fd); } catch { /* already gone */ }
  }

  private maybeClose(): void {
    if (this.closed || this.fastN > 0) return;
    if (this.peerGone || this.destroyed) {
      // The main thread answers every slow request (its replies are dropped), except after destroy().
      if (this.slowN > 0 && !this.destroyed) return;
      if (this.receiving || this.sending) return; // the socket is shut down: they end
    } else {
      if (this.reading || this.slowN > 0 || this.sending || this.out.length || this.stageLen) return;
      if (this.receiving) {
        // Shut down (not DISC) with a receive posted: ending it is the last step.
        this.why ||= 'disconnected';
        this.shutdownSocket();
        return;
      }
    }
    this.close(this.why || 'disconnected');
  }

  private close(reason: string): void {
    this.closed = true;
    this.loop.wait(this, false);
    const slabs = this.loop.slabs;
    for (const o of this.out) slabs.release(o.slot);
    this.out = [];
    if (this.stage >= 0) slabs.release(this.stage);
    if (this.payload) slabs.release(this.payload.slot);
    slabs.release(this.recvSlot);
    try { loadNative().close(this.fd); } catch { /* already closed */ }
    this.target.close();
    this.post({ t: 'closed', id: this.id, reason });
  }

  private mustAlloc(bytes: number): number {
    const s = this.loop.slabs.alloc(bytes);
    if (s < 0) throw new Error(`I/O worker out of buffer memory (${this.loop.slabs.inUse} bytes in use)`);
    return s;
  }

  /** A buffer for replies; when the worker has none left the connection is dropped (never a half reply). */
  private replyAlloc(bytes: number): number {
    const s = this.loop.slabs.alloc(bytes);
    if (s < 0) this.gone(`I/O worker out of buffer memory (${this.loop.slabs.inUse} bytes in use)`);
    return s;
  }
}

function errSimple(cookie: Buffer): Buffer {
  const r = Buffer.allocUnsafe(16);
  putSimpleReply(r, 0, ERR.EIO, cookie, 0);
  return r;
}
