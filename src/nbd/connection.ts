// One NBD client connection: the fixed-newstyle handshake here, on the main
// thread, then the transmission phase on an I/O worker (transmission.ts),
// which receives every request and serves what the device's view places;
// the requests it hands back are answered here (handle), concurrently and
// in any order, their replies sent whole through the worker. Memory per
// connection is bounded by the worker: at most `maxInflight` requests /
// `maxInflightBytes` bytes in progress and `maxQueuedReplyBytes` of unsent
// replies, beyond which it stops receiving until it catches up. A TLS
// connection's plaintext reaches its worker through a socket pair.
import { Socket } from 'net';
import { ByteQueue } from './byte-queue';
import {
  BASE_ALLOCATION, chunkHeader, CLIENT_FLAG, CMD, CMD_FLAG, ERR, errorChunk, IHAVEOPT, INFO, infoBlockSize,
  infoExport, infoString, nbdError, OPT, optReply, REP, REPLY_FLAG_DONE, REPLY_TYPE,
  serverGreeting, simpleReply, STATE, TFLAG,
} from './protocol';
import type { ClientInfo, ExportInfo, ExportResolver, NbdExport } from './export';
import type { NbdTls } from './tls';
import { loadNative } from '../native';
import { WorkerWire, type WireRequest } from './worker-wire';
import type { IoWorkers } from '../io/pool';

export interface ConnectionOptions {
  exports: ExportResolver;
  minBlock?: number;
  preferredBlock?: number;
  maxPayload?: number;
  maxInflight?: number;
  maxInflightBytes?: number;
  maxQueuedReplyBytes?: number;
  log?: (msg: string) => void;
  /** The I/O workers for exports that bring none (no device behind them: every request comes back here). */
  io?: () => IoWorkers;
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
// Reads of VIEW_MIN..VIEW_MAX bytes are handed to the worker straight from
// the cache's I/O buffer (it copies them at the end of the tick); smaller
// ones are copied out first (no buffer held for them).
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
  private disconnecting = false;
  closed = false;
  readonly minBlock: number;
  readonly preferredBlock: number;
  readonly maxPayload: number;
  private readonly maxInflight: number;
  private readonly maxInflightBytes: number;
  private readonly maxQueued: number;
  private readonly log: (m: string) => void;
  private views = new Set<() => void>();
  private viewBytes = 0;
  stats = { requests: 0, errors: 0 };
  /** Called once when the connection is gone (socket or I/O worker). */
  onClosed: () => void = () => {};
  // Transmission on an I/O worker (see transmission.ts): the worker owns the
  // socket; this object answers the slow-path requests it hands over.
  private wire: WorkerWire | null = null;
  /** The hand-off to the worker, from GO (or EXPORT_NAME) until the worker owns the connection. */
  private handoff: Promise<void> | null = null;
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
    // After ABORT (or a server shutdown) input is read and dropped: it is
    // never acted on, and reading on is what lets the client's close be seen.
    if (this.disconnecting) return;
    this.q.push(b);
    // Past GO the socket is paused for the hand-off: what arrives goes along.
    if (!this.exp && this.q.length > HANDSHAKE_AHEAD) this.socket.pause();
  };
  private readonly onSocketClose = () => { if (!this.handoff && !this.upgrading) this.onClose(); };
  private upgrading = false;
  private deadline: NodeJS.Timeout | null = null;

  private listen(socket: Socket): void {
    socket.on('data', this.onData);
    socket.on('error', () => {});
    socket.on('close', this.onSocketClose);
  }

  /** STARTTLS: the TLS socket takes over the plain one; what was negotiated before is forgotten (as the spec says). */
  private async startTls(tls: NbdTls): Promise<void> {
    const plain = this.socket;
    plain.off('data', this.onData);
    plain.off('close', this.onSocketClose);
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
   * Closes once the replies queued on the socket are sent (after ABORT, as
   * the I/O worker does after DISC). Until then the socket keeps reading and
   * onData drops what comes: a paused socket holds the client's later bytes
   * unconsumed, its EOF never surfaces behind them, and the connection (fd,
   * buffers) would outlive the client. Nor can a client keep it half-open.
   */
  private closeWhenSent(): void {
    this.disconnecting = true;
    this.q.skip(this.q.length);
    const socket = this.socket;
    socket.resume();
    socket.end(() => socket.destroy());
  }

  /** Stop taking requests, finish the ones in flight, then close. */
  async shutdown(): Promise<void> {
    this.disconnecting = true;
    if (!this.handoff) { this.socket.destroy(); return; }
    await this.handoff;
    const wire = this.wire as WorkerWire | null;
    if (wire) { wire.shutdown(); await this.wireClosed; }
  }

  /** Reply bytes queued and not yet sent (on the socket, or in the I/O worker). */
  get unsentBytes(): number { return this.wire ? this.wire.stats().unsentBytes : this.socket.writableLength; }

  /** The export this connection transmits on (null during the handshake). */
  get export(): NbdExport | null { return this.exp; }

  /** I/O worker transmission counters (null until the worker has the connection). */
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
    this.handoff = this.toWorker(exp).catch((e) => {
      // A client that left during the hand-off is just gone.
      if (!this.socket.destroyed) this.log(`nbd: cannot start transmission on an I/O worker: ${(e as Error).message}`);
      this.socket.destroy();
      this.onClose();
    });
  }

  /**
   * Hands the connection to an I/O worker. The negotiation replies must be
   * on the wire first, and bytes the client already sent (pipelined
   * requests) go along with it. A plain socket's descriptor becomes the
   * worker's; a TLS socket stays here, relaying plaintext to and from the
   * worker's end of a socket pair.
   */
  private async toWorker(exp: NbdExport): Promise<void> {
    const socket = this.socket;
    socket.pause();
    await new Promise<void>((resolve) => socket.write(Buffer.alloc(0), () => resolve()));
    if (socket.destroyed) throw new Error('socket closed during hand-off');
    while (socket.read() !== null) { /* the 'data' listener queues it */ }
    const { workers, gate } = exp.io ? exp.io() : { workers: this.workers(), gate: 0 };
    const native = loadNative();
    let fd: number, relay: Socket | null = null;
    if (this.client.tls) {
      const [mine, theirs] = native.socketPair();
      try { relay = new Socket({ fd: mine, readable: true, writable: true }); } catch (e) { native.close(mine); native.close(theirs); throw e; }
      fd = theirs;
    } else {
      const own = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
      if (typeof own !== 'number' || own < 0) throw new Error('socket has no file descriptor');
      fd = native.dup(own);
    }
    const initial = this.q.take(this.q.length);
    let resolveClosed!: () => void;
    this.wireClosed = new Promise((r) => { resolveClosed = r; });
    try {
      this.wire = new WorkerWire(workers, fd, gate, {
        structured: this.structured, readOnly: !!exp.readOnly, size: exp.size, minBlock: this.minBlock,
        maxPayload: this.maxPayload, maxInflight: this.maxInflight, maxInflightBytes: this.maxInflightBytes,
        maxQueuedReplyBytes: this.maxQueued,
      }, Uint8Array.from(initial), (kind, message) => {
        if (kind === 'requests') { this.onWireRequests(); return; }
        if (message !== 'disconnected' && message !== 'client went away') this.log(`nbd: connection closed: ${message}`);
        this.wire = null;
        this.onClose();
        resolveClosed();
      });
    } catch (e) { native.close(fd); relay?.destroy(); throw e; }
    socket.off('data', this.onData);
    socket.off('close', this.onSocketClose);
    if (!relay) { socket.destroy(); return; }
    // Both directions keep their backpressure: a client that stops reading
    // fills the relay's socket and then the worker's, which counts it unsent.
    relay.on('error', () => {});
    socket.pipe(relay);
    relay.pipe(socket);
    socket.on('close', () => relay!.destroy());
    relay.on('close', () => socket.destroy());
  }

  private workers(): IoWorkers {
    if (!this.opts.io) throw new Error('the export has no I/O workers and the server gave none');
    return this.opts.io();
  }

  private onWireRequests(): void {
    const wire = this.wire;
    if (!wire) return;
    for (const r of wire.take()) this.dispatch(r, r.type === CMD.WRITE ? r.payload : null);
  }

  /** Replies go to the wire whole, batched per tick. */
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

  /** A request the worker handed over: handled here, its reply and its count go back to the worker. */
  private dispatch(req: WireRequest, payload: Buffer | null): void {
    if (TRACE) this.log(`nbd: request type=${req.type} flags=${req.flags} offset=${req.offset} length=${req.length}`);
    this.stats.requests++;
    this.handle(req, payload).catch((e) => this.replyError(req, e)).finally(() => {
      if (TRACE) this.log(`nbd: done type=${req.type} offset=${req.offset}`);
      this.wireDone++;
      this.wireDoneBytes += req.cost; // what the worker counted in flight for it
      this.wireFlush();
    });
  }

  private async handle(req: WireRequest, payload: Buffer | null): Promise<void> {
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

  private ok(req: WireRequest): void { this.send(simpleReply(0, req.cookie)); }

  private fail(req: WireRequest, error: number, message: string): void {
    this.stats.errors++;
    if (this.structured && (req.type === CMD.READ || req.type === CMD.BLOCK_STATUS)) this.send(errorChunk(req.cookie, error, message));
    else this.send(simpleReply(error, req.cookie));
  }

  private replyError(req: WireRequest, e: unknown): void {
    const err = e as { errno?: number; message?: string };
    this.fail(req, nbdError(err.errno), err.message ?? 'error');
  }

  /** Queues a reply payload; `done` runs once the worker has copied it. */
  private sendData(data: Buffer, done?: () => void): void {
    this.send(data);
    if (done) this.wireRelease.push(done);
  }

  /**
   * Queues reply buffers; the worker copies them at the end of this tick.
   * Every part of one reply is queued in the same tick, so it goes out whole.
   */
  private send(...bufs: Buffer[]): void {
    for (const b of bufs) if (b.length) this.wireOut.push(b);
    this.wireFlush();
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
