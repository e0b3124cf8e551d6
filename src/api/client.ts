// A small client for the daemon's HTTP API (used by the CLI): a unix socket
// path or an http:// URL, with an optional bearer token.
import * as http from 'http';
import { StrataError, type ErrnoCode } from '../errors';

export class ApiClient {
  constructor(private readonly target: string, private readonly token?: string) {}

  async request<T = unknown>(method: string, path: string, body?: unknown): Promise<T> {
    const data = body === undefined ? undefined : JSON.stringify(body);
    const isUrl = /^https?:\/\//.test(this.target);
    const base = isUrl ? new URL(this.target) : null;
    const opts: http.RequestOptions = {
      method, path,
      ...(base ? { host: base.hostname, port: base.port || 80 } : { socketPath: this.target }),
      headers: {
        ...(data ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) } : {}),
        ...(this.token ? { authorization: `Bearer ${this.token}` } : {}),
      },
    };
    const { status, text } = await new Promise<{ status: number; text: string }>((resolve, reject) => {
      const req = http.request(opts, (res) => {
        let t = '';
        res.setEncoding('utf8');
        res.on('data', (c) => { t += c; });
        res.on('end', () => resolve({ status: res.statusCode ?? 0, text: t }));
      });
      req.on('error', (e) => reject(new StrataError('EIO', `cannot reach the strata daemon at ${this.target}: ${e.message}`)));
      if (data) req.write(data);
      req.end();
    });
    const json = text ? JSON.parse(text) : undefined;
    if (status >= 400) {
      const code = (json?.error?.code && /^E[A-Z0-9]+$/.test(json.error.code) ? json.error.code : status === 404 ? 'ENOENT' : status === 409 ? 'EBUSY' : status < 500 ? 'EINVAL' : 'EIO') as ErrnoCode;
      const msg = String(json?.error?.message ?? `HTTP ${status}`).replace(/^E[A-Z0-9]+: /, '');
      throw new StrataError(code, msg);
    }
    return json as T;
  }
}
