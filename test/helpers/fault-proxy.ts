// A loopback HTTP proxy between the S3 client and a real S3 server that
// injects faults into chosen requests: an error status (5xx, throttling), a
// delay, a connection reset before any reply, a reply cut off mid-body, or a
// request body with one byte flipped on its way to the server.
// Requests that match no armed rule pass through unchanged (headers too, so
// SigV4 signatures still verify upstream).
import * as http from 'http';
import type { AddressInfo } from 'net';

export type Fault =
  | { kind: 'status'; status: number; code?: string }
  | { kind: 'delay'; ms: number }
  | { kind: 'reset' }
  | { kind: 'cutBody' }
  | { kind: 'corruptRequest' }
  /** Answer in the server's place with this status and no body (an operation the server lacks). */
  | { kind: 'reply'; status: number };

export interface Seen { method: string; url: string }
export interface Rule { match: (r: Seen) => boolean; fault: Fault; times: number; hits: number }

export class FaultProxy {
  readonly rules: Rule[] = [];
  readonly seen: Seen[] = [];
  private constructor(private server: http.Server, public upstreamPort: number) {}

  static async start(upstreamPort: number): Promise<FaultProxy> {
    const server = http.createServer();
    const proxy = new FaultProxy(server, upstreamPort);
    server.on('request', (req, res) => proxy.handle(req, res));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    return proxy;
  }

  get port(): number { return (this.server.address() as AddressInfo).port; }
  get endpoint(): string { return `http://127.0.0.1:${this.port}`; }

  /** Arms a fault for the next `times` requests matching `match` (default: all). */
  inject(fault: Fault, opts: { times?: number; match?: (r: Seen) => boolean } = {}): Rule {
    const rule = { match: opts.match ?? (() => true), fault, times: opts.times ?? Infinity, hits: 0 };
    this.rules.push(rule);
    return rule;
  }

  clear(): void { this.rules.length = 0; this.seen.length = 0; }

  close(): Promise<void> {
    this.server.closeAllConnections();
    return new Promise((r) => this.server.close(() => r()));
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    const seen = { method: req.method!, url: req.url! };
    this.seen.push(seen);
    const rule = this.rules.find((r) => r.hits < r.times && r.match(seen));
    if (rule) rule.hits++;
    const f = rule?.fault;
    if (f?.kind === 'reset') { req.socket.destroy(); return; }
    if (f?.kind === 'status') {
      req.resume();
      req.on('end', () => {
        const code = f.code ?? (f.status === 503 ? 'SlowDown' : 'InternalError');
        res.writeHead(f.status, { 'content-type': 'application/xml' });
        res.end(`<?xml version="1.0" encoding="UTF-8"?><Error><Code>${code}</Code><Message>injected</Message></Error>`);
      });
      return;
    }
    if (f?.kind === 'reply') {
      req.resume();
      req.on('end', () => { res.writeHead(f.status); res.end(); });
      return;
    }
    if (f?.kind === 'delay') {
      // Hold the request; if the client gave up meanwhile, never forward it
      // (a late write landing after the client's retry would be a different test).
      req.pause();
      setTimeout(() => { if (!req.socket.destroyed) this.forward(req, res, false); }, f.ms);
      return;
    }
    if (f?.kind === 'corruptRequest') {
      const body: Buffer[] = [];
      req.on('data', (c) => body.push(c));
      req.on('end', () => {
        const b = Buffer.concat(body);
        if (b.length) b[b.length >> 1] ^= 0x01;
        this.forward(req, res, false, b);
      });
      return;
    }
    this.forward(req, res, f?.kind === 'cutBody');
  }

  private forward(req: http.IncomingMessage, res: http.ServerResponse, cut: boolean, body?: Buffer): void {
    const headers = { ...req.headers };
    delete headers.expect; // unsigned; this proxy answers 100-continue itself
    const up = http.request({ host: '127.0.0.1', port: this.upstreamPort, method: req.method, path: req.url, headers, agent: false }, (ures) => {
      if (!cut) {
        res.writeHead(ures.statusCode!, ures.headers);
        ures.pipe(res);
        return;
      }
      const chunks: Buffer[] = [];
      ures.on('data', (c) => chunks.push(c));
      ures.on('end', () => {
        const body = Buffer.concat(chunks);
        res.writeHead(ures.statusCode!, { ...ures.headers, 'content-length': String(body.length) });
        res.write(body.subarray(0, body.length >> 1), () => res.socket?.destroy());
      });
    });
    up.on('error', () => res.socket?.destroy());
    res.on('close', () => up.destroy());
    if (body) { up.end(body); return; }
    req.pipe(up);
    req.resume();
  }
}
