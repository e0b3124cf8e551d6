// NBD listener: a unix socket (mode 0600) by default, TCP only when asked and
// on loopback unless told otherwise. Each connection is independent: a bad
// or vanished client only ever closes its own connection.
import * as net from 'net';
import * as fs from 'fs';
import { NbdConnection, type ConnectionOptions } from './connection';
import type { ExportResolver, NbdExport } from './export';
import type { NbdTls } from './tls';
import { IoWorkers } from '../io/pool';
import { SharedHeap } from '../wasm';

export interface NbdServerOptions extends Omit<ConnectionOptions, 'exports' | 'refuse' | 'tls' | 'transport' | 'io'> {
  /** TLS for TCP connections (off, on, require); unix-socket connections are offered it when it is not off, never required to. */
  tls?: NbdTls;
  exports: ExportResolver;
  /** Most connections at once (default 1000); the next ones are refused with a reason. */
  maxConnections?: number;
  /**
   * The I/O workers that relay the requests of exports with no device
   * behind them (an engine's: `engine.core.io()`); without them the server
   * starts a pool of its own the first time one is connected.
   */
  io?: () => IoWorkers;
}

/** Refused connections kept open to tell the client why; beyond this they are just closed. */
const MAX_REFUSING = 64;

export class NbdServer {
  private servers: net.Server[] = [];
  private conns = new Set<NbdConnection>();
  private refusing = 0;
  private lastRefusalLog = 0;
  // The workers that relay an export with no device behind it: the ones
  // given, else a pool of its own started when such an export is first connected.
  private ownIo: IoWorkers | null = null;
  private readonly io: () => IoWorkers;

  constructor(private readonly opts: NbdServerOptions) {
    this.io = opts.io ?? (() => (this.ownIo ??= new IoWorkers(new SharedHeap({ reserveBytes: 1 << 20 }), { log: opts.log })));
  }

  get connections(): number { return this.conns.size; }

  /** Reply bytes queued in this process for clients that have not read them yet. */
  get unsentBytes(): number { let n = 0; for (const c of this.conns) n += c.unsentBytes; return n; }

  /** Listens on a unix socket, replacing a stale socket file; mode 0600. */
  async listenUnix(path: string): Promise<string> {
    try {
      if (fs.lstatSync(path).isSocket()) fs.unlinkSync(path);
    } catch { /* absent */ }
    const srv = this.makeServer('unix');
    const old = process.umask(0o177);
    try { await new Promise<void>((res, rej) => { srv.once('error', rej); srv.listen(path, () => { srv.off('error', rej); res(); }); }); } finally { process.umask(old); }
    fs.chmodSync(path, 0o600);
    return path;
  }

  /** Listens on TCP; host defaults to loopback. Returns the bound address (port and the address the host resolved to). */
  async listenTcp(port = 0, host = '127.0.0.1'): Promise<net.AddressInfo> {
    const srv = this.makeServer('tcp');
    await new Promise<void>((res, rej) => { srv.once('error', rej); srv.listen(port, host, () => { srv.off('error', rej); res(); }); });
    return srv.address() as net.AddressInfo;
  }

  private makeServer(transport: 'unix' | 'tcp'): net.Server {
    // A unix socket is as private as its mode: TLS is offered there, never required.
    const tls = transport === 'unix' && this.opts.tls?.mode === 'require' ? this.opts.tls.withMode('on') : this.opts.tls;
    const srv = net.createServer({ noDelay: true }, (socket) => {
      const max = this.opts.maxConnections ?? 1000;
      if (this.conns.size >= max) { this.refuse(socket, max); return; }
      const c = new NbdConnection(socket, { ...this.opts, tls, transport, io: this.io });
      this.conns.add(c);
      c.onClosed = () => { this.conns.delete(c); };
      void c.start();
    });
    this.servers.push(srv);
    return srv;
  }

  /** Over the limit: the client gets the greeting and a policy error naming the limit (NBD has no other way to say why). */
  private refuse(socket: net.Socket, max: number): void {
    const now = Date.now();
    if (now - this.lastRefusalLog > 1000) {
      this.lastRefusalLog = now;
      this.opts.log?.(`nbd: refusing connections: ${this.conns.size} open, the limit is ${max}`);
    }
    if (this.refusing >= MAX_REFUSING) { socket.destroy(); return; }
    this.refusing++;
    const c = new NbdConnection(socket, { ...this.opts, handshakeTimeoutMs: 2000, log: () => {},
      refuse: `too many NBD connections (the limit is ${max}); try again later` });
    c.onClosed = () => { this.refusing--; };
    void c.start();
  }

  /** Disconnects every client of an export (its device is going away). */
  dropExport(exp: NbdExport): void {
    for (const c of this.conns) if (c.export === exp) c.destroy();
  }

  /**
   * Stops listening, lets in-flight requests finish (up to `graceMs`), then
   * closes every connection.
   */
  async close(graceMs = 10_000): Promise<void> {
    const closing = Promise.all(this.servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
    this.servers = [];
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      Promise.all([...this.conns].map((c) => c.shutdown())),
      new Promise<void>((r) => { timer = setTimeout(r, graceMs); }),
    ]);
    clearTimeout(timer);
    for (const c of this.conns) c.destroy();
    await closing;
    await this.ownIo?.close();
  }
}
