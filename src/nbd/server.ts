// NBD listener: a unix socket (mode 0600) by default, TCP only when asked and
// on loopback unless told otherwise. Each connection is independent: a bad
// or vanished client only ever closes its own connection.
import * as net from 'net';
import * as fs from 'fs';
import { NbdConnection, type ConnectionOptions } from './connection';
import type { ExportResolver, NbdExport } from './export';

export interface NbdServerOptions extends Omit<ConnectionOptions, 'exports'> {
  exports: ExportResolver;
  maxConnections?: number;
}

export class NbdServer {
  private servers: net.Server[] = [];
  private conns = new Set<NbdConnection>();

  constructor(private readonly opts: NbdServerOptions) {}

  get connections(): number { return this.conns.size; }

  /** Listens on a unix socket, replacing a stale socket file; mode 0600. */
  async listenUnix(path: string): Promise<string> {
    try {
      if (fs.lstatSync(path).isSocket()) fs.unlinkSync(path);
    } catch { /* absent */ }
    const srv = this.makeServer();
    const old = process.umask(0o177);
    try { await new Promise<void>((res, rej) => { srv.once('error', rej); srv.listen(path, () => { srv.off('error', rej); res(); }); }); } finally { process.umask(old); }
    fs.chmodSync(path, 0o600);
    return path;
  }

  /** Listens on TCP; host defaults to loopback. Returns the bound port. */
  async listenTcp(port = 0, host = '127.0.0.1'): Promise<number> {
    const srv = this.makeServer();
    await new Promise<void>((res, rej) => { srv.once('error', rej); srv.listen(port, host, () => { srv.off('error', rej); res(); }); });
    return (srv.address() as net.AddressInfo).port;
  }

  private makeServer(): net.Server {
    const srv = net.createServer({ noDelay: true }, (socket) => {
      if (this.opts.maxConnections && this.conns.size >= this.opts.maxConnections) { socket.destroy(); return; }
      const c = new NbdConnection(socket, this.opts);
      this.conns.add(c);
      c.onClosed = () => { this.conns.delete(c); };
      void c.start();
    });
    this.servers.push(srv);
    return srv;
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
  }
}
