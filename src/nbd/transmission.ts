// The NBD transmission phase of one connection, run by an I/O worker's loop
// (src/io/loop.ts) after JavaScript on the main thread negotiated it
// (connection.ts). The worker receives requests through its ring, serves
// each READ and WRITE the device's view can place right here (the engine's
// rules for that are src/io/block-io.ts; this file is the protocol) and hands
// everything else (cold data, copy-on-write, FLUSH, TRIM, WRITE_ZEROES,
// CACHE, BLOCK_STATUS, FUA, errors) to the connection on the main thread,
// whose complete replies come back through the worker's port. Replies are
// queued whole, so they never interleave. Memory is bounded: the worker
// stops receiving while too many requests or reply bytes are pending.
import * as native from '../native';
import { BlockIo } from '../io/block-io';
import type { Channel, IoLoop } from '../io/loop';
import * as slabs from '../io/slabs';
import * as P from './protocol';

// Module bindings as local constants: the hot path runs per request, and an
// imported binding is a getter call under the CommonJS transform.
const { SEND, RECV } = native.OP;
const { CMD, CMD_FLAG, ERR, REQ, REQUEST_LEN, REQUEST_MAGIC } = P;
const { errorChunk, nbdError, putReadReplyHeader, putSimpleReply, readReplyHeaderLen, simpleReply } = P;
const off = slabs.offsetOf;
const loadNative = native.loadNative;

export interface TransmissionOptions {
  structured: boolean; readOnly: boolean; size: number; minBlock: number; maxPayload: number;
  maxInflight: number; maxInflightBytes: number; maxQueuedReplyBytes: number;
}

/** A request the worker hands to the main thread. */
/** `cost`: the bytes the worker counts in flight for it until the main thread says it finished. */
export interface SlowRequest { type: number; flags: number; cookie: Uint8Array; offset: number; length: number; payload: Uint8Array | null; cost: number }

/** What a worker posts about a connection. */
export type TransmissionEvent =
  | { t: 'requests'; id: number; reqs: SlowRequest[] }
  | { t: 'closed'; id: number; reason: string };

/** Counters the main thread reads without a message (a Float64Array over a SharedArrayBuffer). */
export const STAT = { FAST: 0, SLOW: 1, PENDING_SLOW: 2, PHASE: 3, UNSENT: 4, LENGTH: 5 } as const;

const RECV_BUF = 128 * 1024;
const STAGE = 256 * 1024;
// Replies at least this large are sent from their own buffer; smaller ones
// are copied together into a staging buffer and go out in one send.
const SEND_ALONE = 64 * 1024;
const PIECE = 8 << 20;
const TAG_RECV = -1, TAG_SEND = -2;

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
  private why = '';
  private closed = false;
  // A WRITE whose payload is still arriving, straight into its own slot.
  private payload: { type: number; flags: number; cookie: Buffer; offset: number; length: number; slot: number; got: number } | null = null;
  // Replies: queued buffers [slot, length, sent], then the staging buffer being filled.
  private out: Array<{ slot: number; len: number; sent: number }> = [];
  private stage = -1;
  private stageLen = 0;
  private unsent = 0;
  // READs served here, from acquire to reply, by tag (0 .. maxInflight-1):
  // preallocated, so a request allocates nothing. (WRITEs served here end
  // within the turn they arrive in: see serveWrite.)
  private readonly tags: Int32Array;
  private freeTags: number;
  private readonly fOff: Float64Array;
  private readonly fLen: Uint32Array;
  private readonly fSlot: Float64Array;
  private readonly fPending: Int32Array;
  private readonly fErr: Int32Array;
  private readonly fT0: Float64Array;
  private readonly cookies: Buffer;
  private fastN = 0;
  private slowN = 0;
  private inflightBytes = 0;
  private toMain: SlowRequest[] = [];

  /** `io`: the device's requests served here (its gate NO_DEVICE: every request goes to the main thread). */
  constructor(readonly id: number, fd: number, private readonly loop: IoLoop, private readonly io: BlockIo,
    private readonly opts: TransmissionOptions, initial: Uint8Array,
    private readonly stats: Float64Array, private readonly post: (e: TransmissionEvent) => void) {
    this.fd = fd;
    this.recvSlot = this.mustAlloc(Math.max(RECV_BUF, initial.length));
    const b = loop.slabs.buf(this.recvSlot);
    b.set(initial, off(this.recvSlot));
    this.rlen = initial.length;
    this.recvCap = Math.max(RECV_BUF, initial.length);
    const n = opts.maxInflight;
    this.tags = new Int32Array(n);
    for (let i = 0; i < n; i++) this.tags[i] = n - 1 - i;
    this.freeTags = n;
    this.fOff = new Float64Array(n);
    this.fLen = new Uint32Array(n);
    this.fSlot = new Float64Array(n);
    this.fPending = new Int32Array(n);
    this.fErr = new Int32Array(n);
    this.fT0 = new Float64Array(n);
    this.cookies = Buffer.alloc(8 * n);
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
  shutdown(): void { this.reading = false; this.loop.touch(this); }

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
    // Only reads are served through the ring (writes are written at once: serveWrite).
    const err = this.io.completeRead(res, op);
    if (err && !this.fErr[tag]) this.fErr[tag] = err;
    if (--this.fPending[tag] === 0) this.finish(tag);
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
      if (b.readUInt32BE(h + REQ.MAGIC) !== REQUEST_MAGIC) { this.gone('bad request magic'); return; }
      const flags = b.readUInt16BE(h + REQ.FLAGS), type = b.readUInt16BE(h + REQ.TYPE);
      const offset = b.readUInt32BE(h + REQ.OFFSET_HI) * 0x100000000 + b.readUInt32BE(h + REQ.OFFSET_LO), length = b.readUInt32BE(h + REQ.LENGTH);
      const c = h + REQ.COOKIE;
      if (type === CMD.DISC) { this.rpos += REQUEST_LEN; this.reading = false; break; }
      if (type === CMD.WRITE) {
        if (length > this.opts.maxPayload) { this.gone(`write of ${length} bytes exceeds the maximum payload`); return; }
        const have = Math.min(length, this.rlen - this.rpos - REQUEST_LEN);
        if (have === length) {
          // The whole payload is here: written straight from the receive buffer.
          const v = this.serveWrite(flags, b, c, offset, length, this.recvSlot, this.rpos + REQUEST_LEN);
          if (v === 'wait') { waiting = true; break; } // parsed again next turn
          if (v === 'slow') this.slow(type, flags, b.subarray(c, c + 8), offset, length, Uint8Array.prototype.slice.call(b, h + REQUEST_LEN, h + REQUEST_LEN + length));
          this.rpos += REQUEST_LEN + length;
          continue;
        }
        // The rest arrives straight into a slot of its own, once no receive
        // into the buffer is in flight (its bytes land after ours).
        if (this.receiving) break;
        const slot = this.loop.slabs.alloc(Math.max(length, 1));
        if (slot < 0) { waiting = true; break; }
        b.copy(this.loop.slabs.buf(slot), off(slot), h + REQUEST_LEN, h + REQUEST_LEN + have);
        const cookie = Buffer.from(b.subarray(c, c + 8));
        this.rpos += REQUEST_LEN + have;
        this.payload = { type, flags, cookie, offset, length, slot, got: have };
        break;
      }
      const v = type === CMD.READ ? this.serveRead(flags, b, c, offset, length) : 'slow';
      if (v === 'wait') { waiting = true; break; }
      if (v === 'slow') this.slow(type, flags, b.subarray(c, c + 8), offset, length, null);
      this.rpos += REQUEST_LEN;
    }
    if (this.rpos === this.rlen && !this.receiving) this.rpos = this.rlen = 0;
    this.loop.wait(this, waiting);
  }

  /** A WRITE's payload is all in its slot: serve it or hand it over. */
  private writeArrived(): Verdict {
    const p = this.payload!;
    const v = this.serveWrite(p.flags, p.cookie, 0, p.offset, p.length, p.slot, 0);
    if (v === 'wait') return v;
    this.payload = null;
    if (v === 'slow') {
      const b = this.loop.slabs.buf(p.slot);
      this.slow(p.type, p.flags, p.cookie, p.offset, p.length, Uint8Array.prototype.slice.call(b, off(p.slot), off(p.slot) + p.length));
    }
    this.loop.slabs.release(p.slot);
    return v;
  }

  /** A READ/WRITE range the planner may place: non-empty, aligned, inside the device. */
  private plannable(offset: number, length: number): boolean {
    const o = this.opts;
    return length > 0 && length <= o.maxPayload && offset % o.minBlock === 0 && length % o.minBlock === 0 &&
      offset + length <= o.size;
  }

  /** Takes a tag for a request; its cookie is copied from c[ca..ca+8). */
  private take(c: Buffer, ca: number): number {
    const t = this.tags[--this.freeTags];
    const k = t * 8, ck = this.cookies;
    for (let i = 0; i < 8; i++) ck[k + i] = c[ca + i];
    return t;
  }

  private serveRead(flags: number, c: Buffer, ca: number, offset: number, length: number): Verdict {
    if ((flags & ~CMD_FLAG.DF) || !this.plannable(offset, length)) return 'slow';
    const io = this.io;
    if (!this.loop.room(io.readRoom)) return 'wait';
    const hdr = readReplyHeaderLen(this.opts.structured);
    const slot = this.loop.slabs.alloc(hdr + length);
    if (slot < 0) return 'wait';
    const tag = this.tags[this.freeTags - 1];
    const n = io.read(this, tag, offset, length, slot, hdr);
    if (typeof n !== 'number') { this.loop.slabs.release(slot); return n === 'busy' ? 'wait' : 'slow'; }
    this.take(c, ca);
    putReadReplyHeader(this.loop.slabs.buf(slot), off(slot), this.opts.structured, c, ca, offset, length);
    this.fOff[tag] = offset; this.fLen[tag] = length;
    this.fSlot[tag] = slot; this.fPending[tag] = n; this.fErr[tag] = 0; this.fT0[tag] = this.loop.now;
    this.fastN++;
    this.inflightBytes += length;
    if (n === 0) this.finish(tag);
    return 'served';
  }

  /** A WRITE whose payload is at slot + at: written now (BlockIo.write), then answered. */
  private serveWrite(flags: number, c: Buffer, ca: number, offset: number, length: number, slot: number, at: number): Verdict {
    if (flags !== 0 || this.opts.readOnly || !this.plannable(offset, length)) return 'slow';
    const res = this.io.write(this, offset, length, slot, at);
    if (res === 'busy') return 'wait';
    if (res === 'slow') return 'slow';
    this.stats[STAT.FAST]++;
    const r = this.reserve(16);
    if (r >= 0) putSimpleReply(this.loop.slabs.buf(this.stage), r, res < 0 ? nbdError(-res) : 0, c, ca);
    return 'served';
  }

  private finish(tag: number): void {
    const offset = this.fOff[tag], length = this.fLen[tag], slot = this.fSlot[tag], errno = this.fErr[tag];
    this.tags[this.freeTags++] = tag;
    this.fastN--;
    this.inflightBytes -= length;
    this.stats[STAT.FAST]++;
    this.io.readDone(offset, length, !errno, this.fT0[tag]);
    const slabs = this.loop.slabs;
    if (this.peerGone || this.destroyed) { slabs.release(slot); return; }
    if (errno) {
      slabs.release(slot);
      const c = this.cookies.subarray(tag * 8, tag * 8 + 8);
      this.queueBytes(this.opts.structured ? errorChunk(c, ERR.EIO, 'I/O error reading the device') : simpleReply(ERR.EIO, c));
    } else this.queueSlot(slot, readReplyHeaderLen(this.opts.structured) + length);
  }

  private slow(type: number, flags: number, cookie: Uint8Array, offset: number, length: number, payload: Uint8Array | null): void {
    const cost = type === CMD.WRITE ? length : type === CMD.READ ? Math.min(length, this.opts.maxPayload) : 0;
    this.toMain.push({ type, flags, cookie: Uint8Array.prototype.slice.call(cookie, 0, 8), offset, length, payload, cost });
    this.slowN++;
    this.inflightBytes += cost;
    this.stats[STAT.SLOW]++;
  }

  private postToMain(): void {
    if (!this.toMain.length) return;
    const reqs = this.toMain;
    this.toMain = [];
    this.post({ t: 'requests', id: this.id, reqs });
  }

  // --------------------------------------------------------------- replies

  /** Room for `n` reply bytes at the end of the staging buffer: the offset in its chunk, or -1 (connection dropped). */
  private reserve(n: number): number {
    if (this.stage >= 0 && this.stageLen + n > STAGE) this.seal();
    if (this.stage < 0) {
      const s = this.loop.slabs.alloc(STAGE);
      if (s < 0) { this.gone(`I/O worker out of buffer memory (${this.loop.slabs.inUse} bytes in use)`); return -1; }
      this.stage = s;
      this.stageLen = 0;
    }
    const at = off(this.stage) + this.stageLen;
    this.stageLen += n;
    this.unsent += n;
    return at;
  }

  private queueBytes(bytes: Uint8Array): void {
    if (this.peerGone || this.destroyed) return;
    if (bytes.length > PIECE) {
      // A batch of replies from the main thread: queued in order, in pieces.
      for (let at = 0; at < bytes.length; at += PIECE) this.queueBytes(bytes.subarray(at, Math.min(bytes.length, at + PIECE)));
      return;
    }
    if (bytes.length >= SEND_ALONE) {
      const slot = this.loop.slabs.alloc(bytes.length);
      if (slot < 0) { this.gone(`I/O worker out of buffer memory (${this.loop.slabs.inUse} bytes in use)`); return; }
      this.loop.slabs.buf(slot).set(bytes, off(slot));
      this.queueSlot(slot, bytes.length);
      return;
    }
    const at = this.reserve(bytes.length);
    if (at >= 0) this.loop.slabs.buf(this.stage).set(bytes, at);
  }

  /** A reply already in a slot: large ones go out from it, small ones are copied to the staging buffer. */
  private queueSlot(slot: number, len: number): void {
    if (len < SEND_ALONE) {
      const at = this.reserve(len);
      if (at >= 0) {
        const slabs = this.loop.slabs, from = slabs.buf(slot), to = slabs.buf(this.stage), so = off(slot);
        if (from === to) to.copyWithin(at, so, so + len); // no allocation
        else from.copy(to, at, so, so + len);
      }
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
        this.loop.push(this, TAG_SEND, SEND, this.fd, o.slot, o.sent, o.len - o.sent, 0);
        this.sending = true;
      }
    }
    const p = this.payload;
    // Never a receive of 0 bytes (it would read as EOF): a complete payload
    // waiting for its stripes, or a full buffer waiting for the parser.
    if (!this.receiving && this.reading && !this.paused() && this.loop.room(1) && !(p && p.got === p.length) &&
      (p || this.rlen - this.rpos < this.recvCap)) {
      if (p) {
        this.loop.push(this, TAG_RECV, RECV, this.fd, p.slot, p.got, p.length - p.got, 0);
      } else {
        if (this.rpos > 0) {
          const b = this.loop.slabs.buf(this.recvSlot), base = off(this.recvSlot);
          b.copy(b, base, base + this.rpos, base + this.rlen);
          this.rlen -= this.rpos;
          this.rpos = 0;
        }
        this.loop.push(this, TAG_RECV, RECV, this.fd, this.recvSlot, this.rlen, this.recvCap - this.rlen, 0);
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
    this.io.close();
    this.post({ t: 'closed', id: this.id, reason });
  }

  private mustAlloc(bytes: number): number {
    const s = this.loop.slabs.alloc(bytes);
    if (s < 0) throw new Error(`I/O worker out of buffer memory (${this.loop.slabs.inUse} bytes in use)`);
    return s;
  }
}
