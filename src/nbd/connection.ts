// One NBD client connection: fixed-newstyle handshake, then transmission.
// Requests run concurrently and are answered as they finish (any order).
// A WRITE's payload is read completely before the export is called, so no
// lock is ever held while waiting on the socket (H3); replies are queued on
// the socket, never behind a lock (H4). Memory per connection is bounded: at
// most `maxInflight` requests / `maxInflightBytes` bytes in progress and
// `maxQueuedReplyBytes` of unsent replies, beyond which the connection stops
// reading from its socket until it catches up.
import type { Socket } from 'net';
import { ByteQueue } from './byte-queue';
import {
  BASE_ALLOCATION, chunkHeader, CLIENT_FLAG, CMD, CMD_FLAG, ERR, errorChunk, IHAVEOPT, INFO, infoBlockSize,
  infoExport, infoString, nbdError, OPT, optReply, parseRequest, REP, REPLY_FLAG_DONE, REPLY_TYPE, Request,
  REQUEST_LEN, serverGreeting, simpleReply, STATE, TFLAG,
} from './protocol';
import type { ClientInfo, ExportInfo, ExportResolver, NbdExport } from './export';
import type { NbdTls } from './tls';
import { loadNative } from '../native';
import { WorkerWire } from './worker-wire';

export interface ConnectionOptions {
  exports: ExportResolver;
  minBlock?: number;
  preferredBlock?: number;
  maxPayload?: number;
  maxInflight?: number;
  maxInflightBytes?: number;
  maxQueuedReplyBytes?: number;
  log?: (msg: string) => void;
  /**
   * Serve the transmission phase on an I/O worker when the export offers
   * one (default: on, unless STRATA_NBD_WORKER=0).
   */
  worker?: boolean;
  /** A client must finish the handshake within this (default 10 s, as qemu-nbd). */
  handshakeTimeoutMs?: number;
  /** Most options one handshake may send (default 4096). */
  maxOptions?: number;
  /** Set: every option is refused with this message (the server is at its connection limit). */
  refuse?: string;
  /** STARTTLS: offered (mode on) or required before anything else (mode require). */
  tls?: NbdTls;
  /** How the client reached us: a unix socket (local, trusted like the socket's mode) or TCP. */
  transport?: ClientInfo['transport'];
}

const MAX_OPTION_LEN = 64 * 1024;
// During the handshake the connection reads no further than one whole
// option ahead, and takes no new option while this many reply bytes are
// unsent: a client that sends options and never reads the replies is
// throttled by its own socket, not by the daemon's memory.
const HANDSHAKE_AHEAD = MAX_OPTION_LEN + 16 + 4096;
const HANDSHAKE_UNSENT = 256 * 1024;
const TRACE = !!process.env.STRATA_NBD_TRACE;
// Reads of VIEW_MIN..VIEW_MAX bytes are sent from their I/O buffer. Below
// 32 KiB a write callback per reply costs more than the copy it saves
// (measured: 4 KiB random reads 54k vs 51k IOPS; 128 KiB reads +20-25%).
const VIEW_MIN = 32 * 1024;
const VIEW_MAX = 1024 * 1024;
const VIEW_BUDGET = 8 * 1024 * 1024; // arena bytes one connection may hold in unsent replies
const KNOWN_CMD_FLAGS = 0x3f;
const META_CONTEXT_ID = 1;

export class NbdConnection {
  private q = new ByteQueue();
  private exp: NbdExport | null = null;
  private structured = false;
  private metaContext = false;
  private inflight = 0;
  private inflightBytes = 0;
  private pendingWrite: Request | null = null;
  private paused = false;
  private disconnecting = false;
  private corked = false;
  closed = false;
  readonly minBlock: number;
  readonly preferredBlock: number;
  readonly maxPayload: number;
  private readonly maxInflight: number;
  private readonly maxInflightBytes: number;
  private readonly maxQueued: number;
  private readonly log: (m: string) => void;
  private drained: Array<() => void> = [];
  private views = new Set<() => void>();
  private viewBytes = 0;
  stats = { requests: 0, errors: 0 };
  /** Called once when the connection is gone (socket or I/O worker). */
  onClosed: () => void = () => {};
  // Transmission on an I/O worker (see transmission.ts): the worker owns the
  // socket; this object answers the slow-path requests it hands over.
  private wire: WorkerWire | null = null;
  private handingOff = false;
  private wireOut: Buffer[] = [];
  /** I/O buffers of replies in wireOut, given back once the wire has copied them. */
  private wireRelease: Array<() => void> = [];
  private wireDone = 0;
  private wireDoneBytes = 0;
  private wireFlushQueued = false;
  private wireClosed: Promise<void> | null = null;

  private socket: Socket;
  /** Who the client is, for the resolver (identity set by a TLS handshake). */
  readonly client: ClientInfo;

  constructor(socket: Socket, private readonly opts: ConnectionOptions) {
    this.socket = socket;
    this.client = { transport: opts.transport ?? 'unix', tls: false, identity: null };
    this.minBlock = opts.minBlock ?? 512;
    this.preferredBlock = opts.preferredBlock ?? 4096;
    this.maxPayload = opts.maxPayload ?? 32 * 1024 * 1024;
    this.maxInflight = opts.maxInflight ?? 128;
    this.maxInflightBytes = opts.maxInflightBytes ?? 64 * 1024 * 1024;
    this.maxQueued = opts.maxQueuedReplyBytes ?? 64 * 1024 * 1024;
    this.log = opts.log ?? (() => {});
    socket.setNoDelay?.(true);
    this.listen(socket);
  }

  private readonly onData = (b: Buffer) => {
    // After DISC or ABORT (or a server shutdown) input is read and dropped:
    // it is never acted on, and reading on is what lets the client's close be seen.
    if (this.disconnecting) return;
    this.q.push(b);
    if (this.exp) { if (!this.handingOff) this.pump(); } else if (this.q.length > HANDSHAKE_AHEAD) this.socket.pause();
  };
  private readonly onSocketClose = () => { if (!this.handingOff && !this.upgrading) this.onClose(); };
  private readonly onDrain = () => { if (this.paused) this.maybeResume(); };
  private upgrading = false;
  private deadline: NodeJS.Timeout | null = null;

  private listen(socket: Socket): void {
    socket.on('data', this.onData);
    socket.on('error', () => {});
    socket.on('close', this.onSocketClose);
    socket.on('drain', this.onDrain);
  }

  /** STARTTLS: the TLS socket takes over the plain one; what was negotiated before is forgotten (as the spec says). */
  private async startTls(tls: NbdTls): Promise<void> {
    const plain = this.socket;
    plain.off('data', this.onData);
    plain.off('close', this.onSocketClose);
    plain.off('drain', this.onDrain);
    this.upgrading = true;
    try {
      const { socket, identity } = await tls.upgrade(plain);
      this.socket = socket;
      this.listen(socket);
      this.client.tls = true;
      this.client.identity = identity;
      this.structured = false;
      this.metaContext = false;
    } catch (e) {
      plain.destroy();
      this.onClose();
      throw e;
    } finally { this.upgrading = false; }
  }

  /** Runs the handshake; transmission then proceeds from socket events. */
  async start(): Promise<void> {
    const ms = this.opts.handshakeTimeoutMs ?? 10_000;
    // Runs until transmission starts or the connection is gone, also past an
    // ABORT: a client that never reads its ACK cannot keep the connection.
    this.deadline = setTimeout(() => {
      if (this.exp || this.closed) return;
      this.log(`nbd: handshake not finished within ${ms} ms, closing connection`);
      this.socket.destroy();
    }, ms);
    this.deadline.unref();
    try {
      this.socket.write(serverGreeting());
      await this.handshake();
    } catch (e) {
      if (!this.closed) this.log(`nbd: handshake ended: ${(e as Error).message}`);
      this.socket.destroy();
    }
  }

  private clearDeadline(): void {
    if (this.deadline) { clearTimeout(this.deadline); this.deadline = null; }
  }

  /**
   * Closes once the replies queued on the socket are sent (after DISC or
   * ABORT, as the I/O worker does). Until then the socket keeps reading and
   * onData drops what comes: a paused socket holds the client's later bytes
   * unconsumed, its EOF never surfaces behind them, and the connection (fd,
   * buffers) would outlive the client. Nor can a client keep it half-open.
   */
  private closeWhenSent(): void {
    this.disconnecting = true;
    this.q.skip(this.q.length);
    this.pendingWrite = null;
    const socket = this.socket;
    socket.resume();
    socket.end(() => socket.destroy());
  }

  /** Stop taking requests, finish the ones in flight, then close. */
  async shutdown(): Promise<void> {
    this.disconnecting = true;
    if (this.wire) { this.wire.shutdown(); await this.wireClosed; return; }
    if (!this.exp) { this.socket.destroy(); return; }
    // No new requests: what is queued or still arriving is dropped (onData),
    // and the socket keeps reading so a client that leaves is noticed now.
    this.q.skip(this.q.length);
    this.pendingWrite = null;
    if (!this.handingOff) this.socket.resume(); // mid hand-off the worker is about to own the descriptor
    await this.idle();
    const wire = this.wire as WorkerWire | null; // set meanwhile if a hand-off was under way
    if (wire) { wire.shutdown(); await this.wireClosed; return; }
    this.closeWhenSent();
  }

  private idle(): Promise<void> {
    if (this.inflight === 0) return Promise.resolve();
    return new Promise((r) => this.drained.push(r));
  }

  /** Reply bytes queued and not yet sent (on the socket, or in the I/O worker). */
  get unsentBytes(): number { return this.wire ? this.wire.stats().unsentBytes : this.socket.writableLength; }

  /** The export this connection transmits on (null during the handshake). */
  get export(): NbdExport | null { return this.exp; }

  /** I/O worker transmission counters (null while the main thread serves the connection). */
  wireStats() { return this.wire?.stats() ?? null; }

  /** Closes at once; replies not yet sent are dropped. */
  destroy(): void {
    if (this.wire) this.wire.destroy();
    else this.socket.destroy();
  }

  private onClose(): void {
    if (this.closed) return;
    this.closed = true;
    this.clearDeadline();
    this.onClosed();
    // Writes still queued on a dead socket may never call back: give their
    // I/O buffers back now (release is idempotent).
    for (const r of [...this.views]) r();
    this.q.end(new Error('connection closed'));
  }

  // ------------------------------------------------------------ handshake

  private async handshake(): Promise<void> {
    const q = this.q;
    await q.want(4);
    const cflags = q.take(4).readUInt32BE(0);
    if (cflags & ~(CLIENT_FLAG.FIXED_NEWSTYLE | CLIENT_FLAG.NO_ZEROES)) throw new Error(`unknown client flags 0x${cflags.toString(16)}`);
    const noZeroes = (cflags & CLIENT_FLAG.NO_ZEROES) !== 0;
    const maxOptions = this.opts.maxOptions ?? 4096;
    for (let n = 0; ; n++) {
      if (this.socket.writableLength > HANDSHAKE_UNSENT) await this.writtenOut();
      if (this.socket.isPaused() && q.length <= HANDSHAKE_AHEAD) this.socket.resume();
      await q.want(16);
      const h = q.take(16);
      if (h.readBigUInt64BE(0) !== IHAVEOPT) throw new Error('bad option magic');
      const opt = h.readUInt32BE(8), len = h.readUInt32BE(12);
      // Checked before buffering: a huge length would otherwise make us hold
      // it all in memory. Such a client is dropped.
      if (len > MAX_OPTION_LEN) throw new Error(`option ${opt} of ${len} bytes is too long`);
      await q.want(len);
      const data = q.take(len);
      const reply = (type: number, d?: Buffer) => this.socket.write(optReply(opt, type, d));
      const refusal = this.opts.refuse ?? (n >= maxOptions ? `more than ${maxOptions} options in one handshake` : null);
      if (refusal) {
        if (opt !== OPT.EXPORT_NAME) reply(REP.ERR_POLICY, Buffer.from(`strata: ${refusal}`));
        this.socket.end();
        throw new Error(refusal);
      }
      const tls = this.opts.tls;
      if (tls && tls.mode === 'require' && !this.client.tls && opt !== OPT.STARTTLS && opt !== OPT.ABORT) {
        if (opt === OPT.EXPORT_NAME) throw new Error('EXPORT_NAME before STARTTLS on a server that requires TLS');
        reply(REP.ERR_TLS_REQD, Buffer.from('strata: this server requires TLS (STARTTLS) first'));
        continue;
      }
      switch (opt) {
        case OPT.STARTTLS: {
          if (!tls || tls.mode === 'off') { reply(REP.ERR_UNSUP); break; }
          if (this.client.tls) { reply(REP.ERR_INVALID, Buffer.from('already TLS')); break; }
          if (len !== 0) { reply(REP.ERR_INVALID); break; }
          // Nothing may follow STARTTLS in the clear: the next bytes are the TLS handshake.
          if (q.length) throw new Error('data after STARTTLS before its reply');
          await new Promise<void>((resolve) => this.socket.write(optReply(opt, REP.ACK), () => resolve()));
          await this.startTls(tls);
          break;
        }
        case OPT.EXPORT_NAME: {
          const exp = await this.resolve(data.toString('utf8'));
          if (!exp) throw new Error(`unknown export ${JSON.stringify(data.toString('utf8'))}`);
          const b = Buffer.alloc(noZeroes ? 10 : 134);
          b.writeBigUInt64BE(BigInt(exp.size), 0);
          b.writeUInt16BE(this.transmissionFlags(exp), 8);
          this.socket.write(b);
          this.enter(exp);
          return;
        }
        case OPT.ABORT:
          reply(REP.ACK);
          this.closeWhenSent();
          return;
        case OPT.LIST:
          if (len !== 0) { reply(REP.ERR_INVALID); break; }
          for (const e of this.opts.exports.list(this.client)) {
            const name = Buffer.from(e.name, 'utf8');
            const d = Buffer.alloc(4 + name.length);
            d.writeUInt32BE(name.length, 0);
            name.copy(d, 4);
            reply(REP.SERVER, d);
          }
          reply(REP.ACK);
          break;
        case OPT.STRUCTURED_REPLY:
          if (len !== 0) { reply(REP.ERR_INVALID); break; }
          this.structured = true;
          reply(REP.ACK);
          break;
        case OPT.INFO:
        case OPT.GO: {
          const parsed = parseInfoRequest(data);
          if (!parsed) { reply(REP.ERR_INVALID); break; }
          // INFO only asks: it never opens a device; GO does.
          const exp = opt === OPT.GO ? await this.resolve(parsed.name) : await this.query(parsed.name);
          if (!exp) { reply(REP.ERR_UNKNOWN, Buffer.from(`no export named ${parsed.name}`)); break; }
          reply(REP.INFO, infoExport(exp.size, this.transmissionFlags(exp)));
          // Always advertised: strata enforces 512-byte granularity, and a
          // client that ignores it gets clean EINVAL errors, not corruption.
          reply(REP.INFO, infoBlockSize(this.minBlock, this.preferredBlock, this.maxPayload));
          if (parsed.infos.includes(INFO.NAME)) reply(REP.INFO, infoString(INFO.NAME, parsed.name));
          if (parsed.infos.includes(INFO.DESCRIPTION) && exp.description) reply(REP.INFO, infoString(INFO.DESCRIPTION, exp.description));
          reply(REP.ACK);
          if (opt === OPT.GO) { this.enter(exp as NbdExport); return; }
          break;
        }
        case OPT.LIST_META_CONTEXT:
        case OPT.SET_META_CONTEXT: {
          if (!this.structured) { reply(REP.ERR_INVALID, Buffer.from('structured replies first')); break; }
          const parsed = parseMetaRequest(data);
          if (!parsed) { reply(REP.ERR_INVALID); break; }
          if (!(await this.query(parsed.name))) { reply(REP.ERR_UNKNOWN); break; }
          const matches = opt === OPT.LIST_META_CONTEXT && parsed.queries.length === 0
            ? true : parsed.queries.some((q) => q === BASE_ALLOCATION || q === 'base:');
          if (opt === OPT.SET_META_CONTEXT) this.metaContext = parsed.queries.includes(BASE_ALLOCATION);
          if (matches && (opt === OPT.LIST_META_CONTEXT || this.metaContext)) {
            const name = Buffer.from(BASE_ALLOCATION);
            const d = Buffer.alloc(4 + name.length);
            d.writeUInt32BE(META_CONTEXT_ID, 0);
            name.copy(d, 4);
            reply(REP.META_CONTEXT, d);
          }
          reply(REP.ACK);
          break;
        }
        default:
          // Unknown (or unsupported: EXTENDED_HEADERS) options are
          // answered without losing framing.
          reply(REP.ERR_UNSUP);
      }
    }
  }

  /** Resolves once the socket has sent what is queued on it (or closed). */
  private writtenOut(): Promise<void> {
    return new Promise((resolve) => {
      const done = () => { this.socket.off('drain', done); this.socket.off('close', done); resolve(); };
      this.socket.on('drain', done);
      this.socket.on('close', done);
    });
  }

  private async resolve(name: string): Promise<NbdExport | undefined> {
    try { return await this.opts.exports.get(name, this.client); } catch (e) {
      this.log(`nbd: export ${JSON.stringify(name)}: ${(e as Error).message}`);
      return undefined;
    }
  }

  private async query(name: string): Promise<ExportInfo | undefined> {
    const r = this.opts.exports;
    try { return await (r.describe ? r.describe(name, this.client) : r.get(name, this.client)); } catch (e) {
      this.log(`nbd: export ${JSON.stringify(name)}: ${(e as Error).message}`);
      return undefined;
    }
  }

  private transmissionFlags(exp: ExportInfo): number {
    let f = TFLAG.HAS_FLAGS | TFLAG.SEND_FLUSH | TFLAG.SEND_FUA | TFLAG.SEND_TRIM | TFLAG.SEND_WRITE_ZEROES |
      TFLAG.SEND_FAST_ZERO | TFLAG.CAN_MULTI_CONN | TFLAG.SEND_CACHE;
    if (this.structured) f |= TFLAG.SEND_DF;
    if (exp.readOnly) f |= TFLAG.READ_ONLY;
    return f;
  }

  private enter(exp: NbdExport): void {
    this.exp = exp;
    this.clearDeadline();
    // The worker reads the socket's descriptor itself: never under TLS.
    if (exp.io && !this.client.tls && (this.opts.worker ?? process.env.STRATA_NBD_WORKER !== '0')) {
      this.handingOff = true;
      this.toWorker(exp).catch((e) => {
        this.handingOff = false;
        // A client that left during the hand-off is just gone.
        if (this.socket.destroyed) { this.onClose(); return; }
        this.log(`nbd: I/O worker unavailable, serving from the main thread: ${(e as Error).message}`);
        this.socket.resume();
        this.pump();
      });
      return;
    }
    this.socket.resume(); // the handshake may have paused it
    this.pump();
  }

  /**
   * Hands the socket to an I/O worker. The negotiation replies must be on
   * the wire first, and bytes the client already sent (pipelined requests)
   * go along with it.
   */
  private async toWorker(exp: NbdExport): Promise<void> {
    this.socket.pause();
    await new Promise<void>((resolve) => this.socket.write(Buffer.alloc(0), () => resolve()));
    if (this.socket.destroyed) throw new Error('socket closed during hand-off');
    while (this.socket.read() !== null) { /* the 'data' listener queues it */ }
    const fd = (this.socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
    if (typeof fd !== 'number' || fd < 0) throw new Error('socket has no file descriptor');
    const { workers, target } = exp.io!();
    const initial = this.q.take(this.q.length);
    let resolveClosed!: () => void;
    this.wireClosed = new Promise((r) => { resolveClosed = r; });
    // The worker gets its own descriptor; the JS socket closes its one.
    const own = loadNative().dup(fd);
    try {
      this.wire = new WorkerWire(workers, own, target, {
        structured: this.structured, readOnly: !!exp.readOnly, size: exp.size, minBlock: this.minBlock,
        maxPayload: this.maxPayload, maxInflight: this.maxInflight, maxInflightBytes: this.maxInflightBytes,
        maxQueuedReplyBytes: this.maxQueued,
      }, Uint8Array.from(initial), (kind, message) => {
        if (kind === 'requests') { this.onWireRequests(); return; }
        if (message !== 'disconnected' && message !== 'client went away') this.log(`nbd: connection closed: ${message}`);
        this.wire = null;
        this.onClose();
        for (const r of this.drained.splice(0)) r();
        resolveClosed();
      });
    } catch (e) { loadNative().close(own); throw e; }
    this.socket.destroy();
  }

  private onWireRequests(): void {
    const wire = this.wire;
    if (!wire) return;
    for (const r of wire.take()) {
      if (r.type === CMD.WRITE) this.dispatch(r, r.payload);
      else this.dispatch(r, null);
    }
  }

  /** Slow-path replies go to the wire whole, batched per tick. */
  private wireFlush(): void {
    if (this.wireFlushQueued) return;
    this.wireFlushQueued = true;
    process.nextTick(() => {
      this.wireFlushQueued = false;
      const bufs = this.wireOut, releases = this.wireRelease;
      this.wireOut = [];
      this.wireRelease = [];
      const n = this.wireDone, bytes = this.wireDoneBytes;
      this.wireDone = this.wireDoneBytes = 0;
      try { this.wire?.reply(bufs.length ? bufs : null, n, bytes); } finally { for (const r of releases) r(); }
    });
  }

  // --------------------------------------------------------- transmission

  private pump(): void {
    const q = this.q;
    while (!this.paused && !this.disconnecting && !this.closed) {
      if (this.pendingWrite) {
        if (q.length < this.pendingWrite.length) return;
        const req = this.pendingWrite;
        this.pendingWrite = null;
        this.dispatch(req, q.take(req.length));
        continue;
      }
      if (q.length < REQUEST_LEN) return;
      const req = parseRequest(q.take(REQUEST_LEN));
      if (!req) { this.log('nbd: bad request magic, closing connection'); this.socket.destroy(); return; }
      // Copy the cookie: the header buffer may be a slice of a reused chunk.
      req.cookie = Buffer.from(req.cookie);
      if (req.type === CMD.WRITE) {
        // A write's payload length is checked before anything is buffered
        // for it; one above the maximum cannot be skipped safely: drop.
        if (req.length > this.maxPayload) {
          this.log(`nbd: write of ${req.length} bytes exceeds the ${this.maxPayload}-byte maximum, closing connection`);
          this.socket.destroy();
          return;
        }
        this.pendingWrite = req;
        continue;
      }
      if (req.type === CMD.DISC) { this.disconnecting = true; void this.shutdown(); return; }
      this.dispatch(req, null);
    }
  }

  private dispatch(req: Request, payload: Buffer | null): void {
    if (TRACE) this.log(`nbd: request type=${req.type} flags=${req.flags} offset=${req.offset} length=${req.length}`);
    this.inflight++;
    const cost = payload ? payload.length : req.type === CMD.READ ? Math.min(req.length, this.maxPayload) : 0;
    this.inflightBytes += cost;
    this.stats.requests++;
    // Replies of requests in flight join the unsent ones, so both count
    // against the unsent bound (as on an I/O worker).
    if (this.inflight >= this.maxInflight || this.inflightBytes >= this.maxInflightBytes ||
      this.socket.writableLength + this.inflightBytes > this.maxQueued) this.pause();
    this.handle(req, payload).catch((e) => this.replyError(req, e)).finally(() => {
      if (TRACE) this.log(`nbd: done type=${req.type} offset=${req.offset}`);
      this.inflight--;
      this.inflightBytes -= cost;
      if (this.wire) { this.wireDone++; this.wireDoneBytes += cost; this.wireFlush(); }
      if (this.paused) this.maybeResume();
      if (this.inflight === 0) for (const r of this.drained.splice(0)) r();
    });
  }

  private async handle(req: Request, payload: Buffer | null): Promise<void> {
    const exp = this.exp!;
    const { type, flags, offset, length } = req;
    if (flags & ~KNOWN_CMD_FLAGS) return this.fail(req, ERR.EINVAL, 'unknown command flags');
    const fua = (flags & CMD_FLAG.FUA) !== 0;
    const rangeOk = (limitErr: number) => {
      if (offset % this.minBlock || length % this.minBlock) { this.fail(req, ERR.EINVAL, 'misaligned request'); return false; }
      if (offset + length > exp.size) { this.fail(req, limitErr, 'request beyond the end of the export'); return false; }
      return true;
    };
    switch (type) {
      case CMD.READ: {
        // With simple replies such a read is a client error; structured
        // replies allow asking for more, and a server that will not split
        // the reply answers EOVERFLOW so the client retries smaller.
        if (length > this.maxPayload) return this.fail(req, this.structured ? ERR.EOVERFLOW : ERR.EINVAL, 'read longer than the maximum payload');
        if (!rangeOk(ERR.EINVAL)) return;
        // Larger reads go out straight from the I/O buffer they were read into
        // (no copy); the buffer returns to the arena once the socket has taken
        // it. Bounded per connection, so a client that stops reading cannot
        // pin the arena other connections need.
        let data: Buffer, release: (() => void) | undefined;
        // An I/O worker copies replies at the end of the tick: its views
        // come back at once, and its slow reads make no garbage.
        if (length >= VIEW_MIN && exp.readView && length <= VIEW_MAX && this.viewBytes + length <= VIEW_BUDGET) {
          this.viewBytes += length; // reserved before the await: the budget holds under concurrency
          let v: { data: Buffer; release(): void };
          try { v = await exp.readView(offset, length); } catch (e) { this.viewBytes -= length; throw e; }
          data = v.data;
          release = () => { this.viewBytes -= length; this.views.delete(release!); v.release(); };
          this.views.add(release);
          if (this.closed) { release(); return; }
        } else data = length ? await exp.read(offset, length) : Buffer.alloc(0);
        const head = this.structured ? chunkHeader(REPLY_FLAG_DONE, REPLY_TYPE.OFFSET_DATA, req.cookie, 8 + data.length) : simpleReply(0, req.cookie);
        if (this.structured) {
          const off = Buffer.allocUnsafe(8);
          off.writeBigUInt64BE(BigInt(offset), 0);
          this.send(head, off);
        } else this.send(head);
        this.sendData(data, release);
        return;
      }
      case CMD.WRITE:
        if (exp.readOnly) return this.fail(req, ERR.EPERM, 'read-only export');
        if (!rangeOk(ERR.ENOSPC)) return;
        if (length) await exp.write(offset, payload!, fua);
        return this.ok(req);
      case CMD.FLUSH:
        await exp.flush();
        return this.ok(req);
      case CMD.TRIM:
        if (exp.readOnly) return this.fail(req, ERR.EPERM, 'read-only export');
        if (!rangeOk(ERR.ENOSPC)) return;
        if (length) await exp.trim(offset, length, fua);
        return this.ok(req);
      case CMD.WRITE_ZEROES:
        if (exp.readOnly) return this.fail(req, ERR.EPERM, 'read-only export');
        if (!rangeOk(ERR.ENOSPC)) return;
        if (length) await exp.writeZeroes(offset, length, { fua, noHole: (flags & CMD_FLAG.NO_HOLE) !== 0, fast: (flags & CMD_FLAG.FAST_ZERO) !== 0 });
        return this.ok(req);
      case CMD.CACHE:
        if (!rangeOk(ERR.EINVAL)) return;
        if (length) await exp.cache(offset, length);
        return this.ok(req);
      case CMD.BLOCK_STATUS: {
        if (!this.structured || !this.metaContext) return this.fail(req, ERR.EINVAL, 'no metadata context negotiated');
        if (length === 0 || offset >= exp.size) return this.fail(req, ERR.EINVAL, 'bad block status range');
        const end = Math.min(exp.size, offset + length);
        const lo = offset - (offset % this.minBlock), hi = Math.ceil(end / this.minBlock) * this.minBlock;
        let ranges = exp.zeroMap(lo, hi - lo);
        if (flags & CMD_FLAG.REQ_ONE) ranges = ranges.slice(0, 1);
        const descs: number[] = [];
        for (const r of ranges) {
          // Descriptor lengths are 32-bit: split long runs.
          for (let done = 0; done < r.length;) {
            const n = Math.min(r.length - done, 0xfffff000);
            descs.push(n, r.zero ? STATE.HOLE | STATE.ZERO : 0);
            done += n;
          }
        }
        // The first descriptor starts at the requested offset.
        descs[0] -= offset - lo;
        const body = Buffer.allocUnsafe(4 + descs.length * 4);
        body.writeUInt32BE(META_CONTEXT_ID, 0);
        descs.forEach((v, i) => body.writeUInt32BE(v, 4 + i * 4));
        this.send(chunkHeader(REPLY_FLAG_DONE, REPLY_TYPE.BLOCK_STATUS, req.cookie, body.length), body);
        return;
      }
      default:
        return this.fail(req, ERR.EINVAL, `unknown command ${type}`);
    }
  }

  private ok(req: Request): void { this.send(simpleReply(0, req.cookie)); }

  private fail(req: Request, error: number, message: string): void {
    this.stats.errors++;
    if (this.structured && (req.type === CMD.READ || req.type === CMD.BLOCK_STATUS)) this.send(errorChunk(req.cookie, error, message));
    else this.send(simpleReply(error, req.cookie));
  }

  private replyError(req: Request, e: unknown): void {
    const err = e as { errno?: number; message?: string };
    this.fail(req, nbdError(err.errno), err.message ?? 'error');
  }

  /** Queues a reply payload; `done` runs once the socket no longer needs it. */
  private sendData(data: Buffer, done?: () => void): void {
    if (this.wire) { this.send(data); if (done) { this.wireRelease.push(done); this.wireFlush(); } return; }
    if (this.closed || this.socket.destroyed) { done?.(); return; }
    if (data.length === 0) { done?.(); return; }
    this.send();
    if (done) this.socket.write(data, () => done());
    else this.socket.write(data);
    if (this.socket.writableLength + this.inflightBytes > this.maxQueued) this.pause();
  }

  /** Queues reply buffers; they go out together at the end of this tick. */
  private send(...bufs: Buffer[]): void {
    if (this.wire) {
      // Copied by the wire at the end of the tick; every part of one reply is
      // queued in the same tick, so it goes out whole.
      for (const b of bufs) if (b.length) this.wireOut.push(b);
      this.wireFlush();
      return;
    }
    if (this.closed || this.socket.destroyed) return;
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(() => { this.corked = false; if (!this.socket.destroyed) this.socket.uncork(); });
    }
    for (const b of bufs) if (b.length) this.socket.write(b);
    if (this.socket.writableLength + this.inflightBytes > this.maxQueued) this.pause();
  }

  private pause(): void {
    // The wire applies its own limits; once disconnecting, input is only dropped (and must be read to see the client go).
    if (this.paused || this.wire || this.disconnecting) return;
    this.paused = true;
    this.socket.pause();
  }

  private maybeResume(): void {
    if (this.wire) return;
    if (this.inflight < this.maxInflight / 2 && this.inflightBytes < this.maxInflightBytes / 2 &&
      this.socket.writableLength + this.inflightBytes <= this.maxQueued / 2) {
      this.paused = false;
      if (!this.disconnecting) { this.socket.resume(); this.pump(); }
    }
  }
}

/** An export name (u32 length + bytes) at the start of option data; null if it does not fit. */
function readName(d: Buffer, trailer: number): { name: string; at: number } | null {
  if (d.length < 4) return null;
  const nameLen = d.readUInt32BE(0);
  if (4 + nameLen + trailer > d.length) return null;
  return { name: d.toString('utf8', 4, 4 + nameLen), at: 4 + nameLen };
}

/** INFO/GO data: name, u16 count, count × u16 info types. */
function parseInfoRequest(d: Buffer): { name: string; infos: number[] } | null {
  const r = readName(d, 2);
  if (!r) return null;
  const n = d.readUInt16BE(r.at);
  if (d.length !== r.at + 2 + n * 2) return null;
  const infos: number[] = [];
  for (let i = 0; i < n; i++) infos.push(d.readUInt16BE(r.at + 2 + i * 2));
  return { name: r.name, infos };
}

/** LIST/SET_META_CONTEXT data: name, u32 count, count × (u32 length + query). */
function parseMetaRequest(d: Buffer): { name: string; queries: string[] } | null {
  const r = readName(d, 4);
  if (!r) return null;
  const nq = d.readUInt32BE(r.at);
  let at = r.at + 4;
  const queries: string[] = [];
  for (let i = 0; i < nq; i++) {
    if (at + 4 > d.length) return null;
    const l = d.readUInt32BE(at);
    if (at + 4 + l > d.length) return null;
    queries.push(d.toString('utf8', at + 4, at + 4 + l));
    at += 4 + l;
  }
  return at === d.length ? { name: r.name, queries } : null;
}
