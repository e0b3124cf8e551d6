// The daemon's HTTP API, version 1 (described by openapi.ts). Handlers
// validate every field and id before touching the engine; long work
// (imports, snapshot uploads) runs as an operation resource.
import * as fs from 'fs';
import * as path from 'path';
import type { Engine } from '../engine';
import { codecName, ID_RE, parseCodec, type LayerHeader } from '../format';
import { StrataError } from '../errors';
import { bad, bool, fields, HttpError, int, oneOf, optional, Router, str } from './http';
import type { Operations } from './operations';
import { CLIENT_RE, DEVICE_ID_RE, type DeviceManager } from './devices';
import { openapi } from './openapi';

export interface ApiContext {
  engine: Engine;
  devices: DeviceManager;
  ops: Operations;
  /** Imports only from inside this directory when set. */
  importRoot?: string;
  ready(): boolean;
  metrics?(): Promise<string>;
  onSnapshot?(seconds: number, ok: boolean, uploadedBytes: number): void;
  version: string;
}

const layerId = (v: string) => { if (!ID_RE.test(v)) throw bad(`invalid layer id ${JSON.stringify(v)}`); return v; };
const deviceId = (v: string) => { if (!DEVICE_ID_RE.test(v)) throw bad(`invalid device id ${JSON.stringify(v)}`); return v; };

function layerSummary(h: LayerHeader) {
  return {
    id: h.chain[0], parent: h.chain[1] ?? null, chain: h.chain, size: h.virtualSize, blockSize: h.blockSize,
    codec: codecName(h.codec), dataBytes: h.dataSize, frames: h.frames.length, extents: h.extents.length,
  };
}

/** An absolute path to an existing regular file or block device, inside importRoot when set. */
function importPath(v: unknown, k: string, root?: string): string {
  if (typeof v !== 'string' || v.length === 0 || v.length > 4096 || v.includes('\0')) throw bad(`${k} must be a path`);
  if (!path.isAbsolute(v)) throw bad(`${k} must be an absolute path`);
  let real: string;
  try { real = fs.realpathSync(v); } catch { throw new HttpError(404, `${k}: ${v} does not exist`); }
  if (root) {
    const r = fs.realpathSync(root);
    if (real !== r && !real.startsWith(r + path.sep)) throw new HttpError(403, `${k} must be inside ${root}`);
  }
  const st = fs.statSync(real);
  if (!st.isFile() && !st.isBlockDevice()) throw bad(`${k}: ${v} is not a regular file or block device`);
  return real;
}

async function headers(engine: Engine): Promise<LayerHeader[]> {
  const ids = await engine.listLayers();
  const hs = await Promise.all(ids.map((id) => engine.inspect(id).catch(() => null)));
  return hs.filter((h): h is LayerHeader => h !== null);
}

export function routes(ctx: ApiContext): Router {
  const { engine, devices, ops } = ctx;
  const r = new Router();

  r.add('GET', '/v1/health', () => ({ body: { status: 'ok', version: ctx.version, uptimeSeconds: Math.round(process.uptime()) } }));
  r.add('GET', '/v1/ready', () => (ctx.ready() ? { body: { ready: true } } : { status: 503, body: { ready: false } }));
  r.add('GET', '/v1/openapi.json', () => ({ body: openapi(ctx.version) }));
  if (ctx.metrics) r.add('GET', '/metrics', async () => ({ text: await ctx.metrics!(), contentType: 'text/plain; version=0.0.4' }));

  // ------------------------------------------------------------ templates
  r.add('POST', '/v1/templates', (req) => {
    const b = fields(req.body, {
      path: (v, k) => importPath(v, k, ctx.importRoot),
      codec: optional(oneOf('zstd', 'lz4', 'none')),
      level: optional(int(1, 19)),
    });
    const op = ops.start('import', b.path, async (progress) => {
      const res = await engine.importImage(b.path, {
        codec: parseCodec(b.codec ?? 'zstd'), level: b.level,
        onProgress: (p) => progress({ phase: p.phase, done: p.done, total: p.total }),
      });
      return { template: layerSummary(res.header), stats: res.stats };
    });
    return { status: 202, body: op };
  });
  r.add('GET', '/v1/templates', async () => ({ body: (await headers(engine)).filter((h) => h.chain.length === 1).map(layerSummary) }));
  r.add('GET', '/v1/templates/:id', async (req) => ({ body: layerSummary(await engine.inspect(layerId(req.params.id))) }));
  r.add('DELETE', '/v1/templates/:id', async (req) => {
    const h = await engine.inspect(layerId(req.params.id));
    if (h.chain.length !== 1) throw new HttpError(409, `${h.chain[0]} is a snapshot; delete it under /v1/snapshots`);
    await engine.deleteLayer(h.chain[0]);
    return { status: 204 };
  });

  // -------------------------------------------------------------- devices
  r.add('POST', '/v1/devices', async (req) => {
    const b = fields(req.body, {
      layer: str(ID_RE, 'a layer id (32 hex digits)'),
      id: optional(str(DEVICE_ID_RE, '1-64 characters of [A-Za-z0-9_-]')),
      frontend: optional(oneOf('nbd', 'ublk', 'auto')),
      client: optional(str(CLIENT_RE, 'a TLS identity: 1-128 characters of [A-Za-z0-9._@-]')),
    });
    const m = await devices.create(b.layer, { id: b.id, frontend: b.frontend, client: b.client });
    return { status: 201, body: devices.describe(m) };
  });
  r.add('GET', '/v1/devices', () => ({ body: devices.list().map((m) => devices.describe(m)) }));
  r.add('GET', '/v1/devices/:id', (req) => {
    const m = devices.get(deviceId(req.params.id));
    if (!m) throw new StrataError('ENOENT', `no device ${req.params.id}`);
    return { body: devices.describe(m) };
  });
  r.add('DELETE', '/v1/devices/:id', async (req) => {
    await devices.delete(deviceId(req.params.id));
    return { status: 204 };
  });

  // ------------------------------------------------------------ snapshots
  r.add('POST', '/v1/devices/:id/snapshots', (req) => {
    fields(req.body, {});
    const m = devices.get(deviceId(req.params.id));
    if (!m) throw new StrataError('ENOENT', `no device ${req.params.id}`);
    const op = ops.start('snapshot', m.id, async (progress) => {
      const t0 = performance.now();
      try {
        const s = await m.dev.snapshot({ onProgress: (p) => progress({ phase: p.phase, done: p.done, total: p.total }) });
        ctx.onSnapshot?.((performance.now() - t0) / 1000, true, s.stats.compressedBytes);
        return { snapshot: layerSummary(s.header), device: m.id, frozenMs: s.frozenMs, stats: s.stats };
      } catch (e) { ctx.onSnapshot?.((performance.now() - t0) / 1000, false, 0); throw e; }
    });
    return { status: 202, body: op };
  });
  r.add('GET', '/v1/snapshots', async () => ({ body: (await headers(engine)).filter((h) => h.chain.length > 1).map(layerSummary) }));
  r.add('GET', '/v1/snapshots/:id', async (req) => {
    const h = await engine.inspect(layerId(req.params.id));
    if (h.chain.length === 1) throw new StrataError('ENOENT', `${h.chain[0]} is a template, not a snapshot`);
    return { body: layerSummary(h) };
  });
  r.add('DELETE', '/v1/snapshots/:id', async (req) => {
    const h = await engine.inspect(layerId(req.params.id));
    if (h.chain.length === 1) throw new HttpError(409, `${h.chain[0]} is a template; delete it under /v1/templates`);
    await engine.deleteLayer(h.chain[0]);
    return { status: 204 };
  });

  // ------------------------------------------------------------------- gc
  r.add('POST', '/v1/gc', (req) => {
    const b = fields(req.body, { dryRun: optional(bool), graceSeconds: optional(int(600, 10 * 365 * 86400)) });
    const op = ops.start('gc', undefined, async (progress) => {
      const rep = await engine.gc({ dryRun: b.dryRun ?? true, graceMs: (b.graceSeconds ?? 86400) * 1000, onProgress: (p) => progress({ ...p }) });
      return { ...rep, removed: rep.removed.slice(0, 1000), removedCount: rep.removed.length };
    });
    return { status: 202, body: op };
  });

  // ----------------------------------------------------------- operations
  r.add('GET', '/v1/operations', () => ({ body: ops.list() }));
  r.add('GET', '/v1/operations/:id', (req) => {
    const id = req.params.id;
    if (!/^[0-9a-f]{16}$/.test(id)) throw bad(`invalid operation id ${JSON.stringify(id)}`);
    const op = ops.get(id);
    if (!op) throw new StrataError('ENOENT', `no operation ${id}`);
    return { body: op };
  });
  return r;
}
