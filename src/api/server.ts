// The API listener: a unix socket (mode 0600) by default or TCP on loopback.
// Listening beyond loopback requires a bearer token; when a token is set,
// every request must carry it.
import * as fs from 'fs';
import * as http from 'http';
import * as net from 'net';
import { timingSafeEqual } from 'crypto';
import { send, type Router } from './http';
import { isLoopbackAddress } from '../net-address';

export interface ApiListen { socket?: string; host?: string; port?: number; token?: string }

/** One line per request: id (from x-request-id or generated), method, path, status, duration. */
export type AccessLog = (entry: { reqId: string; method: string; path: string; status: number; ms: number }) => void;

export async function startApi(router: Router, listen: ApiListen, log: (e: unknown, what: string) => void,
  access: AccessLog = () => {}): Promise<{ server: http.Server; address: string }> {
  const want = listen.token ? Buffer.from(`Bearer ${listen.token}`) : null;
  let seq = 0;
  const server = http.createServer((req, res) => {
    const t0 = performance.now();
    const given = String(req.headers['x-request-id'] ?? '');
    const reqId = /^[A-Za-z0-9._-]{1,64}$/.test(given) ? given : `r${(++seq).toString(36)}`;
    res.setHeader('x-request-id', reqId);
    res.on('finish', () => access({ reqId, method: req.method ?? '', path: (req.url ?? '').split('?')[0], status: res.statusCode, ms: Math.round((performance.now() - t0) * 10) / 10 }));
    if (want) {
      const got = Buffer.from(String(req.headers.authorization ?? ''));
      if (got.length !== want.length || !timingSafeEqual(got, want)) {
        send(res, { status: 401, body: { error: { status: 401, code: 'unauthorized', message: 'missing or wrong bearer token' } } });
        return;
      }
    }
    router.handle(req, res, log).catch((e) => { log(e, 'api'); if (!res.headersSent) { res.writeHead(500); res.end(); } });
  });
  server.requestTimeout = 60_000;
  server.headersTimeout = 10_000;
  server.maxHeadersCount = 64;
  let address: string;
  if (listen.port !== undefined) {
    const host = listen.host ?? '127.0.0.1';
    await new Promise<void>((res, rej) => { server.once('error', rej); server.listen(listen.port, host, () => res()); });
    const a = server.address() as net.AddressInfo;
    // Decided on the bound address: the name given may resolve anywhere.
    if (!isLoopbackAddress(a.address) && !listen.token) {
      await new Promise((r) => server.close(r));
      throw new Error(`the API may listen on ${host} (${a.address}, beyond loopback) only with a bearer token (--api-token or STRATA_API_TOKEN)`);
    }
    address = `http://${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}`;
  } else {
    const sock = listen.socket!;
    try { if (fs.lstatSync(sock).isSocket()) fs.unlinkSync(sock); } catch { /* absent */ }
    const old = process.umask(0o177);
    try { await new Promise<void>((res, rej) => { server.once('error', rej); server.listen(sock, () => res()); }); } finally { process.umask(old); }
    fs.chmodSync(sock, 0o600);
    address = `unix:${sock}`;
  }
  return { server, address };
}
