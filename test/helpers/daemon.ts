// `node src/server.js` as a child process for end-to-end tests: start it,
// wait for a log line, call its HTTP API, wait for an operation.
import * as http from 'http';
import * as path from 'path';
import { spawn, type ChildProcess } from 'child_process';

export const SERVER = path.join(__dirname, '..', '..', 'src', 'server.js');

export interface Daemon { child: ChildProcess; out(): string; exited: Promise<number | null> }

export function startDaemon(args: string[], env: NodeJS.ProcessEnv = process.env): Daemon {
  const child = spawn(process.execPath, [SERVER, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env });
  let out = '';
  child.stdout!.on('data', (d) => { out += d; });
  child.stderr!.on('data', (d) => { out += d; });
  const exited = new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
  return { child, out: () => out, exited };
}

export async function waitFor(d: Daemon, re: RegExp, ms = 30_000): Promise<void> {
  const t0 = Date.now();
  while (!re.test(d.out()) && Date.now() - t0 < ms) await new Promise((r) => setTimeout(r, 50));
  if (!re.test(d.out())) throw new Error(`daemon never logged ${re}: ${d.out()}`);
}

export type Target = { socketPath: string } | { host: string; port: number };
export interface Reply { status: number; json: any; text: string }

export function call(t: Target, method: string, p: string, body?: unknown, headers: Record<string, string> = {}): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body);
    const req = http.request({ ...t, method, path: p, headers: { ...(data ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) } : {}), ...headers } }, (res) => {
      let text = '';
      res.on('data', (c) => { text += c; });
      res.on('end', () => { let json: any; try { json = JSON.parse(text); } catch { json = undefined; } resolve({ status: res.statusCode!, json, text }); });
    });
    req.on('error', reject);
    if (data) req.write(data);
    req.end();
  });
}

/** Polls an operation until it is no longer running; returns it. */
export async function finished(t: Target, opId: string, ms = 60_000): Promise<any> {
  const t0 = Date.now();
  for (;;) {
    const r = await call(t, 'GET', `/v1/operations/${opId}`);
    if (r.status !== 200) throw new Error(`GET /v1/operations/${opId}: ${r.status} ${r.text}`);
    if (r.json.state !== 'running') return r.json;
    if (Date.now() - t0 > ms) throw new Error(`operation ${opId} did not finish in ${ms} ms`);
    await new Promise((res) => setTimeout(res, 50));
  }
}

/** Sums of the daemon's Prometheus counters by name. */
export async function metrics(t: Target): Promise<Record<string, number>> {
  const r = await call(t, 'GET', '/metrics');
  const m: Record<string, number> = {};
  for (const line of r.text.split('\n')) {
    const x = /^([a-z_]+)(?:\{[^}]*\})? ([0-9.eE+-]+)$/.exec(line);
    if (x) m[x[1]] = (m[x[1]] ?? 0) + Number(x[2]);
  }
  return m;
}
