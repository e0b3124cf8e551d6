// A small raw NBD client for protocol tests: it can do everything a real
// client does and also send whatever a broken or hostile client would.
import * as net from 'net';
import * as tls from 'tls';
import { ByteQueue } from '../../src/nbd/byte-queue';
import { CMD, IHAVEOPT, INFO, OPT, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE } from '../../src/nbd/protocol';

export interface Reply { error: number; data: Buffer; chunks: Array<{ type: number; payload: Buffer }> }

/**
 * STRATA_TEST_NBD_TLS=1: RawClient.open() upgrades with STARTTLS (this
 * pre-shared key) before its options, so a suite runs again over TLS; the
 * server must offer it (nbdFixture does).
 */
export const OVER_TLS = process.env.STRATA_TEST_NBD_TLS === '1';
export const TEST_PSK = { identity: 'tester', key: Buffer.alloc(32, 0x5a) };

export class RawClient {
  readonly q = new ByteQueue();
  closed = false;
  private waiters: Array<() => void> = [];
  private pending = new Map<bigint, { resolve(r: Reply): void; isRead: boolean; len: number; chunks: Reply['chunks'] }>();
  private cookie = 1n;
  structured = false;
  size = 0;
  flags = 0;
  blockInfo: number[] = [];

  private constructor(public socket: net.Socket) { this.listen(socket); }

  private readonly onData = (b: Buffer) => { this.q.push(b); this.wake(); };
  private readonly onClose = () => { this.closed = true; this.q.end(new Error('closed')); this.wake(); };

  private listen(socket: net.Socket): void {
    socket.on('data', this.onData);
    socket.on('close', this.onClose);
    socket.on('error', () => {});
  }

  /** STARTTLS with TEST_PSK; the TLS socket then takes the plain one's place. */
  async startTls(): Promise<void> {
    this.sendOption(OPT.STARTTLS);
    const r = await this.optReply();
    if (r.type !== 1) throw new Error(`STARTTLS refused: 0x${r.type.toString(16)}`);
    const plain = this.socket;
    plain.off('data', this.onData);
    plain.off('close', this.onClose);
    const t = tls.connect({
      socket: plain, checkServerIdentity: () => undefined,
      pskCallback: () => ({ psk: TEST_PSK.key, identity: TEST_PSK.identity }),
      ciphers: 'TLS_AES_128_GCM_SHA256:PSK-AES128-GCM-SHA256',
    });
    await new Promise<void>((res, rej) => { t.once('secureConnect', () => res()); t.once('error', rej); });
    this.socket = t;
    this.listen(t);
  }

  static connect(path: string): Promise<RawClient> {
    return new Promise((res, rej) => {
      const s = net.createConnection(path, () => res(new RawClient(s)));
      s.once('error', rej);
    });
  }

  private wake(): void { for (const w of this.waiters.splice(0)) w(); }
  async want(n: number): Promise<void> {
    while (this.q.length < n) {
      if (this.closed) throw new Error('connection closed');
      await new Promise<void>((r) => this.waiters.push(r));
    }
  }
  /** Resolves true when the server closed the connection within `ms`. */
  async closedWithin(ms: number): Promise<boolean> {
    const t = Date.now();
    while (!this.closed && Date.now() - t < ms) await new Promise((r) => setTimeout(r, 10));
    return this.closed;
  }

  async greeting(flags = 3): Promise<number> {
    await this.want(18);
    const g = this.q.take(18);
    if (g.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('bad greeting');
    const b = Buffer.alloc(4); b.writeUInt32BE(flags, 0);
    this.socket.write(b);
    return g.readUInt16BE(16);
  }

  sendOption(opt: number, data: Buffer = Buffer.alloc(0), magic = IHAVEOPT): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(magic, 0); h.writeUInt32BE(opt, 8); h.writeUInt32BE(data.length, 12);
    this.socket.write(Buffer.concat([h, data]));
  }

  async optReply(): Promise<{ opt: number; type: number; data: Buffer }> {
    await this.want(20);
    const h = this.q.take(20);
    const len = h.readUInt32BE(16);
    await this.want(len);
    return { opt: h.readUInt32BE(8), type: h.readUInt32BE(12), data: Buffer.from(this.q.take(len)) };
  }

  /** Replies to one option until ACK or an error reply. */
  async optReplies(): Promise<Array<{ type: number; data: Buffer }>> {
    const out = [];
    for (;;) {
      const r = await this.optReply();
      out.push(r);
      if (r.type === 1 || r.type >= 0x80000000) return out;
    }
  }

  static infoRequest(name: string, infos: number[] = [INFO.BLOCK_SIZE]): Buffer {
    const n = Buffer.from(name);
    const b = Buffer.alloc(4 + n.length + 2 + infos.length * 2);
    b.writeUInt32BE(n.length, 0); n.copy(b, 4); b.writeUInt16BE(infos.length, 4 + n.length);
    infos.forEach((x, i) => b.writeUInt16BE(x, 6 + n.length + i * 2));
    return b;
  }

  static metaRequest(name: string, queries: string[]): Buffer {
    const parts = [Buffer.alloc(4), Buffer.from(name), Buffer.alloc(4)];
    parts[0].writeUInt32BE(parts[1].length, 0); parts[2].writeUInt32BE(queries.length, 0);
    for (const q of queries) { const l = Buffer.alloc(4); l.writeUInt32BE(Buffer.byteLength(q), 0); parts.push(l, Buffer.from(q)); }
    return Buffer.concat(parts);
  }

  /** Full handshake with GO (and optionally structured replies + base:allocation). */
  static async open(path: string, name: string, opts: { structured?: boolean; meta?: boolean } = {}): Promise<RawClient> {
    const c = await RawClient.connect(path);
    await c.greeting();
    if (OVER_TLS) await c.startTls();
    if (opts.structured) { c.sendOption(OPT.STRUCTURED_REPLY); await c.optReplies(); c.structured = true; }
    if (opts.meta) { c.sendOption(OPT.SET_META_CONTEXT, RawClient.metaRequest(name, ['base:allocation'])); await c.optReplies(); }
    c.sendOption(OPT.GO, RawClient.infoRequest(name));
    const reps = await c.optReplies();
    const last = reps[reps.length - 1];
    if (last.type !== 1) throw new Error(`GO failed: 0x${last.type.toString(16)}`);
    for (const r of reps) {
      if (r.type !== 3) continue;
      const t = r.data.readUInt16BE(0);
      if (t === INFO.EXPORT) { c.size = Number(r.data.readBigUInt64BE(2)); c.flags = r.data.readUInt16BE(10); }
      if (t === INFO.BLOCK_SIZE) c.blockInfo = [r.data.readUInt32BE(2), r.data.readUInt32BE(6), r.data.readUInt32BE(10)];
    }
    c.startReader();
    return c;
  }

  private startReader(): void {
    const loop = async () => {
      try {
        for (;;) {
          await this.want(4);
          const magic = this.q.take(4).readUInt32BE(0);
          if (magic === SIMPLE_REPLY_MAGIC) {
            await this.want(12);
            const h = this.q.take(12);
            const error = h.readUInt32BE(0), cookie = h.readBigUInt64BE(4);
            const p = this.pending.get(cookie);
            if (!p) throw new Error(`reply for unknown cookie ${cookie}`);
            let data = Buffer.alloc(0);
            if (p.isRead && error === 0) { await this.want(p.len); data = Buffer.from(this.q.take(p.len)); }
            this.pending.delete(cookie);
            p.resolve({ error, data, chunks: [] });
          } else if (magic === STRUCTURED_REPLY_MAGIC) {
            await this.want(16);
            const h = this.q.take(16);
            const flags = h.readUInt16BE(0), type = h.readUInt16BE(2), cookie = h.readBigUInt64BE(4), len = h.readUInt32BE(12);
            await this.want(len);
            const payload = Buffer.from(this.q.take(len));
            const p = this.pending.get(cookie);
            if (!p) throw new Error(`chunk for unknown cookie ${cookie}`);
            p.chunks.push({ type, payload });
            if (flags & REPLY_FLAG_DONE) {
              this.pending.delete(cookie);
              const err = p.chunks.find((c) => c.type >= 0x8000);
              const data = Buffer.concat(p.chunks.filter((c) => c.type === 1).map((c) => c.payload.subarray(8)));
              p.resolve({ error: err ? err.payload.readUInt32BE(0) : 0, data, chunks: p.chunks });
            }
          } else throw new Error(`bad reply magic 0x${magic.toString(16)}`);
        }
      } catch {
        for (const p of this.pending.values()) p.resolve({ error: -1, data: Buffer.alloc(0), chunks: [] });
        this.pending.clear();
      }
    };
    void loop();
  }

  static header(type: number, offset: number, length: number, cookie: bigint, flags = 0, magic = REQUEST_MAGIC): Buffer {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(magic, 0); h.writeUInt16BE(flags, 4); h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(cookie, 8); h.writeBigUInt64BE(BigInt(offset), 16); h.writeUInt32BE(length, 24);
    return h;
  }

  request(type: number, offset: number, length: number, opts: { flags?: number; payload?: Buffer } = {}): Promise<Reply> {
    const cookie = this.cookie++;
    const p = new Promise<Reply>((resolve) => this.pending.set(cookie, { resolve, isRead: type === CMD.READ, len: length, chunks: [] }));
    this.socket.write(RawClient.header(type, offset, length, cookie, opts.flags ?? 0));
    if (opts.payload) this.socket.write(opts.payload);
    return p;
  }

  read(offset: number, length: number) { return this.request(CMD.READ, offset, length); }
  write(offset: number, data: Buffer, flags = 0) { return this.request(CMD.WRITE, offset, data.length, { payload: data, flags }); }
  close(): void { this.socket.destroy(); }
}
