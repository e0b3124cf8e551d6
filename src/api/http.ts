// A small JSON-over-HTTP router: path patterns with :params, bounded JSON
// bodies, and one mapping from typed engine errors to HTTP status codes, so
// a bad request gets a 4xx with a reason and never takes the daemon down.
import type { IncomingMessage, ServerResponse } from 'http';
import { StrataError } from '../errors';

export class HttpError extends Error {
  constructor(readonly status: number, message: string) { super(message); }
}

export interface ApiRequest {
  method: string;
  path: string;
  params: Record<string, string>;
  query: URLSearchParams;
  body: unknown;
}
export interface ApiResponse { status?: number; body?: unknown; text?: string; contentType?: string }
export type Handler = (req: ApiRequest) => ApiResponse | Promise<ApiResponse>;

const MAX_BODY = 64 * 1024;

/** HTTP status for an error thrown by a handler or the engine. */
export function statusFor(e: unknown): number {
  if (e instanceof HttpError) return e.status;
  if (e instanceof StrataError) {
    switch (e.code) {
      case 'EINVAL': case 'E2BIG': return 400;
      case 'ENOENT': return 404;
      case 'EEXIST': case 'EBUSY': return 409;
      case 'ENOTSUP': return 501;
      case 'ENOSPC': return 507;
      case 'ESHUTDOWN': return 503;
      default: return 500;
    }
  }
  return 500;
}

export class Router {
  private routes: Array<{ method: string; re: RegExp; keys: string[]; handler: Handler }> = [];

  add(method: string, pattern: string, handler: Handler): this {
    const keys: string[] = [];
    const re = new RegExp('^' + pattern.replace(/:([a-z]+)/g, (_, k) => { keys.push(k); return '([^/]+)'; }) + '$');
    this.routes.push({ method, re, keys, handler });
    return this;
  }

  async handle(req: IncomingMessage, res: ServerResponse, log: (e: unknown, req: string) => void): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://strata');
    const method = req.method ?? 'GET';
    let out: ApiResponse;
    try {
      const matched = this.routes.filter((r) => r.re.test(url.pathname));
      if (matched.length === 0) throw new HttpError(404, `no such endpoint: ${url.pathname}`);
      const route = matched.find((r) => r.method === method);
      if (!route) throw new HttpError(405, `${method} is not allowed on ${url.pathname}`);
      const m = route.re.exec(url.pathname)!;
      const params: Record<string, string> = {};
      route.keys.forEach((k, i) => {
        try { params[k] = decodeURIComponent(m[i + 1]); } catch { throw bad(`bad percent-encoding in ${JSON.stringify(m[i + 1])}`); }
      });
      const body = method === 'POST' || method === 'PUT' || method === 'PATCH' ? await readJson(req) : undefined;
      out = await route.handler({ method, path: url.pathname, params, query: url.searchParams, body });
    } catch (e) {
      const status = statusFor(e);
      if (serverFault(status)) log(e, `${method} ${url.pathname}`);
      out = { status, body: { error: { status, code: (e as { code?: string }).code ?? httpCode(status), message: (e as Error).message } } };
    }
    send(res, out);
  }
}

/**
 * A failure of the server itself (logged as an error). 501 (a frontend this
 * host lacks) and 507 (a limit reached) answer what the client asked for.
 */
export const serverFault = (status: number): boolean => status >= 500 && status !== 501 && status !== 507;

function httpCode(status: number): string {
  return ({ 400: 'bad_request', 401: 'unauthorized', 404: 'not_found', 405: 'method_not_allowed', 409: 'conflict', 413: 'too_large', 415: 'unsupported_media_type' } as Record<number, string>)[status] ?? 'error';
}

export function send(res: ServerResponse, out: ApiResponse): void {
  if (res.headersSent) return;
  const status = out.status ?? 200;
  if (out.text !== undefined) {
    res.writeHead(status, { 'content-type': out.contentType ?? 'text/plain; charset=utf-8' });
    res.end(out.text);
    return;
  }
  if (out.body === undefined) { res.writeHead(status); res.end(); return; }
  const json = JSON.stringify(out.body, null, 2) + '\n';
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(json) });
  res.end(json);
}

/** A JSON object body of at most 64 KiB; an empty body is {}. */
export async function readJson(req: IncomingMessage): Promise<Record<string, unknown>> {
  const declared = Number(req.headers['content-length'] ?? 0);
  if (declared > MAX_BODY) throw new HttpError(413, `request body over ${MAX_BODY} bytes`);
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const c of req) {
    n += (c as Buffer).length;
    if (n > MAX_BODY) throw new HttpError(413, `request body over ${MAX_BODY} bytes`);
    chunks.push(c as Buffer);
  }
  if (n === 0) return {};
  const type = String(req.headers['content-type'] ?? 'application/json');
  if (!/^application\/json\b/.test(type)) throw new HttpError(415, 'send application/json');
  let v: unknown;
  try { v = JSON.parse(Buffer.concat(chunks).toString('utf8')); } catch { throw new HttpError(400, 'body is not valid JSON'); }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new HttpError(400, 'body must be a JSON object');
  return v as Record<string, unknown>;
}

// ------------------------------------------------------------ validation

export const bad = (m: string) => new HttpError(400, m);

/** Only the listed fields; each checked by its validator (undefined = absent). */
export function fields<T extends Record<string, (v: unknown, k: string) => unknown>>(body: unknown, spec: T):
  { [K in keyof T]: ReturnType<T[K]> } {
  const o = (body ?? {}) as Record<string, unknown>;
  // Own properties only: "constructor" or "__proto__" are not fields because an object has them.
  for (const k of Object.keys(o)) if (!Object.hasOwn(spec, k)) throw bad(`unknown field ${JSON.stringify(k)}`);
  const out: Record<string, unknown> = {};
  for (const [k, check] of Object.entries(spec)) out[k] = check(o[k], k);
  return out as { [K in keyof T]: ReturnType<T[K]> };
}

export const optional = <T>(check: (v: unknown, k: string) => T) => (v: unknown, k: string): T | undefined =>
  v === undefined ? undefined : check(v, k);

export const str = (re: RegExp, what: string) => (v: unknown, k: string): string => {
  if (typeof v !== 'string' || !re.test(v)) throw bad(`${k} must be ${what}`);
  return v;
};

export const oneOf = <T extends string>(...vals: T[]) => (v: unknown, k: string): T => {
  if (typeof v !== 'string' || !vals.includes(v as T)) throw bad(`${k} must be one of ${vals.join(', ')}`);
  return v as T;
};

export const bool = (v: unknown, k: string): boolean => {
  if (typeof v !== 'boolean') throw bad(`${k} must be true or false`);
  return v;
};

export const int = (min: number, max: number) => (v: unknown, k: string): number => {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) throw bad(`${k} must be an integer in [${min}, ${max}]`);
  return v;
};
