// The strata daemon: engine + NBD server + HTTP API (src/api/) in one
// process, on an embedded default that works on a fresh machine: a local
// filesystem object store under the data directory, NBD on a unix socket,
// the API on another unix socket. Configuration: src/config.ts.
//
// NBD export names select devices:
//   <device id>        a device created through the API
//   <layer>            the device "default" on that layer  } opened when a client
//   <layer>/<device>   a named device on that layer        } transmits on it (GO or
//                                                           EXPORT_NAME; legacy, limited)
import * as fs from 'fs';
import * as path from 'path';
import { newHostId } from './leases';
import { Engine } from './engine';
import { NbdServer } from './nbd/server';
import type { ClientInfo, ExportInfo, ExportResolver, NbdExport } from './nbd/export';
import { NbdTls } from './nbd/tls';
import { isLoopbackAddress } from './net-address';
import { parseArgs } from './cli';
import { ID_RE } from './format';
import { loadConfig, settingsHelp, type Config } from './config';
import { DeviceManager, DEVICE_ID_RE, type Frontends, type ManagedDevice } from './api/devices';
import { Operations } from './api/operations';
import { routes } from './api/routes';
import { serverFault } from './api/http';
import { startApi } from './api/server';
import { Metrics } from './api/metrics';
import pino from 'pino';
import { features as ublkFeatures, kernelDeviceInfo, ownerId, sweepLeftDevices, type UblkDevice } from './ublk';
import { serveUblk, recoverUblk } from './ublk-export';
import { within } from './deadline';

// Structured JSON logs (pino): one line per event, with device / operation ids as fields.
const logger = pino({ base: { pid: process.pid }, timestamp: pino.stdTimeFunctions.isoTime, formatters: { level: (label) => ({ level: label }) } });
/** This host's name in the store's leases: the setting, else one made once and kept in the data directory. */
function hostIdOf(cfg: Config): string {
  if (cfg.hostId) return cfg.hostId;
  const file = path.join(cfg.data, 'host-id');
  try { return fs.readFileSync(file, 'utf8').trim(); } catch { /* first start */ }
  const id = newHostId();
  fs.writeFileSync(file, `${id}\n`, { mode: 0o600 });
  return id;
}

const log = (level: 'info' | 'warn' | 'error', msg: string, extra: Record<string, unknown> = {}) => logger[level](extra, msg);

const USAGE = `usage: node src/server.js [options]   (flags win over environment, which wins over --config FILE)
  --config FILE${' '.repeat(11)}STRATA_CONFIG         JSON file with any of the settings below (by key)
${settingsHelp()}`;

const VERSION = (() => { try { return JSON.parse(fs.readFileSync(path.join(__dirname, '..', 'package.json'), 'utf8')).version; } catch { return '0'; } })();

/** The ublk frontend when /dev/ublk-control is usable here, and why not otherwise. */
function ublkFrontend(owner: number): { frontend?: Frontends['ublk']; status: string } {
  let f: ReturnType<typeof ublkFeatures>;
  try { f = ublkFeatures(); } catch (e) { return { status: `unavailable: ${(e as Error).message}` }; }
  const wrap = (u: UblkDevice) => ({ id: u.id, path: u.path, detach: () => u.delete(), abandon: () => u.abandon() });
  return {
    status: `available (${f.transport})`,
    frontend: {
      attach: async (dev) => wrap(await serveUblk(dev, { owner })),
      recover: async (id, dev) => {
        try {
          // Gone (e.g. after a reboot), or the id now belongs to someone else.
          const k = kernelDeviceInfo(id);
          if (!k || k.owner !== owner) return null;
          return wrap(await recoverUblk(id, dev));
        } catch (e) {
          // Served on a new kernel device instead; the sweep removes this one.
          log('warn', 'cannot recover kernel device; attaching a new one', { ublk: id, error: (e as Error).message });
          return null;
        }
      },
    },
  };
}

export async function main(argv: string[]): Promise<void> {
  const args = parseArgs(argv);
  if (args.help) { console.log(USAGE); return; }
  const cfg: Config = loadConfig(args);
  const tls = NbdTls.load({ mode: cfg.tls, certificates: cfg.tlsCertificates, pskFile: cfg.tlsPsk, verifyPeer: cfg.tlsVerifyPeer });
  fs.mkdirSync(cfg.data, { recursive: true, mode: 0o700 });
  const cacheDir = path.join(cfg.data, 'cache');
  const engine = await Engine.open({
    store: cfg.store, cacheDir,
    cache: { maxBytes: cfg.cacheMaxBytes, minFreeBytes: cfg.cacheMinFreeBytes, scrubBytesPerSec: cfg.cacheScrubBytesPerSec }, sharedCacheDir: cfg.sharedCache,
    fetchConcurrency: cfg.fetchConcurrency, ioWorkers: cfg.ioWorkers, readaheadFrames: cfg.readaheadFrames,
    profiles: cfg.bootProfiles ? { windowMs: cfg.bootProfileWindowMs, onWarning: (msg, fields) => log('warn', msg, fields) } : false,
    leases: { hostId: hostIdOf(cfg), ttlMs: cfg.leaseTtlMs, onWarning: (msg, fields) => log('warn', msg, fields) },
    maxChain: cfg.maxChain,
  });
  let ready = false;

  // Kernel devices are tagged with the data directory they belong to.
  const ublkOwner = ownerId(cacheDir);
  const ublk = ublkFrontend(ublkOwner);
  const frontends: Frontends = {
    // `server` is created below; devices are only dropped once it exists.
    nbd: { socket: cfg.nbdSocket, dropExport: (exp: NbdExport) => server.dropExport(exp) },
    ublk: ublk.frontend,
  };
  const devices = new DeviceManager(engine, frontends, cfg.maxDevices, cfg.frontend);
  const ops = new Operations((msg, extra) => log('warn', msg, extra));
  const metrics = new Metrics(engine, devices);
  devices.observe = {
    lifecycle: (op, sec) => metrics.deviceOpSeconds.observe({ op }, sec),
    io: (op, sec) => metrics.slowIoSeconds.observe({ op }, sec),
  };

  // Legacy names open their device when a client transmits on it (never on
  // a query), up to their own limit; concurrent first uses share one open.
  // Off by default when NBD listens beyond loopback (decided once bound).
  let byName = cfg.nbdByName ?? true;
  const opening = new Map<string, Promise<NbdExport | undefined>>();
  // A device with an owner is served over TCP only to that TLS identity
  // (unix-socket clients are local: the socket's mode decides who they are).
  const allowed = (m: ManagedDevice, c?: ClientInfo) => !m.client || !c || c.transport === 'unix' || c.identity === m.client;
  const legacy = (name: string): { layer: string; id: string } | null => {
    const [layer, dev = 'default', extra] = name.split('/');
    if (extra !== undefined || !ID_RE.test(layer) || !DEVICE_ID_RE.test(dev)) return null;
    return { layer, id: `${layer.slice(0, 8)}-${dev}` };
  };
  /** A device this client may use, or the `<layer>/<name>` device that transmitting would open. */
  const lookup = (name: string, c?: ClientInfo): { exp: NbdExport } | { toOpen: { layer: string; id: string } } | undefined => {
    const l = devices.get(name) ? null : legacy(name);
    const m = devices.get(name) ?? (l ? devices.get(l.id) : undefined);
    if (m) return allowed(m, c) ? { exp: m.exp } : undefined;
    return l && byName ? { toOpen: l } : undefined;
  };
  const resolver: ExportResolver = {
    async describe(name, c): Promise<ExportInfo | undefined> {
      const r = lookup(name, c);
      if (!r || 'exp' in r) return r?.exp;
      const { layer, id } = r.toOpen;
      const h = await engine.inspect(layer).catch(() => null);
      return h ? { size: h.virtualSize, description: `device ${id} on layer ${layer}, opened when a client transmits on it` } : undefined;
    },
    get(name, c) {
      const r = lookup(name, c);
      if (!r || 'exp' in r) return r?.exp;
      const { layer, id } = r.toOpen;
      let p = opening.get(id);
      if (!p) {
        const open = devices.list().filter((m) => m.byName).length + opening.size;
        if (open >= cfg.nbdByNameMax) {
          log('warn', 'cannot open device by name: limit reached', { device: id, limit: cfg.nbdByNameMax });
          return undefined;
        }
        // Opened over TLS: its owner is the identity that opened it.
        const client = c?.transport === 'tcp' && c.identity ? c.identity : undefined;
        p = devices.create(layer, { id, frontend: 'nbd', byName: true, client }).then((m) => { log('info', 'device opened', { device: id, layer }); return m.exp; })
          .catch((err) => { log('warn', 'cannot open device', { device: id, error: String(err.message) }); return undefined; })
          .finally(() => opening.delete(id));
        opening.set(id, p);
      }
      return p;
    },
    list(c) { return devices.list().filter((m) => allowed(m, c)).map((m) => ({ name: m.id, description: `strata device on layer ${m.dev.layerId}` })); },
  };
  const server = new NbdServer({ exports: resolver, log: (m) => log('warn', m), maxConnections: cfg.nbdMaxConnections, tls, io: () => engine.core.io() });
  const restored = await devices.restore((id, e) => log('error', 'cannot resume device (left on disk)', { device: id, error: e.message }));
  if (restored.length) log('info', 'devices resumed', { devices: restored.map((m) => m.id) });
  if (ublk.frontend) {
    // Kernel devices a dead process of this data directory left and no device here took back.
    const kept = new Set(restored.flatMap((m) => (m.ublk ? [m.ublk.id] : [])));
    for (const l of await sweepLeftDevices(ublkOwner, kept)) {
      const f = { ublk: l.path, state: l.info.state, ownerPid: l.info.ownerPid, why: l.why };
      if (l.outcome === 'removed') log('warn', 'removed a kernel ublk device left by a dead process', f);
      else if (l.outcome === 'failed') log('error', 'cannot remove a kernel ublk device left by a dead process', { ...f, error: l.error?.message });
      else log('info', 'kernel ublk device left alone', f);
    }
  }

  // The I/O workers start now, not when the first client finishes its
  // handshake: a sandbox's first connection should not wait for threads.
  const io = engine.core.io();
  await io.ready;
  log('info', 'I/O workers ready', { workers: io.threads });
  await server.listenUnix(cfg.nbdSocket);
  if (cfg.nbdPort !== undefined) {
    const a = await server.listenTcp(cfg.nbdPort, cfg.nbdHost);
    const port = a.port;
    if (!isLoopbackAddress(a.address)) {
      if (tls.mode !== 'require' && !cfg.insecureNbd) {
        await server.close(0);
        throw new Error(`NBD on ${cfg.nbdHost} (${a.address}) is beyond loopback: without TLS every device there is readable and writable by anyone who can connect; use --tls require (with --tls-certificates or --tls-psk), or pass --insecure-nbd to serve it anyway`);
      }
      if (tls.mode !== 'require') log('warn', 'serving NBD beyond loopback without TLS (--insecure-nbd): every device is readable and writable by anyone who can connect', { host: cfg.nbdHost, address: a.address, port });
      if (cfg.nbdByName === undefined) byName = false;
    }
    frontends.nbd.tcp = { host: cfg.nbdHost, port };
    log('info', 'nbd tcp listening', { host: cfg.nbdHost, address: a.address, port, openByName: byName });
  }
  const router = routes({
    engine, devices, ops, importRoot: cfg.importRoot, ready: () => ready, version: VERSION,
    metrics: () => metrics.text(),
    onSnapshot: (sec, ok, bytes) => { metrics.snapshotSeconds.observe({ result: ok ? 'ok' : 'error' }, sec); metrics.uploadBytes.inc(bytes); },
  });
  const api = await startApi(router, { socket: cfg.apiSocket, port: cfg.apiPort, host: cfg.apiHost, token: cfg.apiToken },
    (e, what) => log('error', 'api request failed', { what, error: String((e as Error)?.stack ?? e) }),
    (entry) => log(serverFault(entry.status) ? 'error' : entry.status >= 400 ? 'warn' : 'info', 'api', entry));
  log('info', 'strata daemon started', {
    version: VERSION, data: cfg.data, store: cfg.store, nbdSocket: cfg.nbdSocket, api: api.address,
    frontend: cfg.frontend, ublk: ublk.status, config: cfg.configFile ?? null,
  });
  if (cfg.import) {
    const r = await engine.importImage(cfg.import);
    log('info', 'imported', { layer: r.id, uri: `nbd+unix:///${r.id}?socket=${cfg.nbdSocket}` });
  }
  const layers = await engine.listLayers();
  if (layers.length === 0) log('info', `no layers yet: POST /v1/templates {"path": IMAGE} on ${api.address}, or restart with --import IMAGE`);
  else log('info', 'layers', { layers, example: `nbd+unix:///${layers[0]}/mydev?socket=${cfg.nbdSocket}` });
  ready = true;

  let stopping = false;
  const stop = async (sig: string) => {
    if (stopping) {
      // A second signal means "now": do not wait for stuck I/O.
      log('warn', 'second signal: exiting without finishing shutdown', { signal: sig });
      process.exit(1);
    }
    stopping = true;
    ready = false;
    log('info', 'stopping', { signal: sig, operations: ops.active, devices: devices.size });
    const step = <T>(p: Promise<T>, ms: number, what: string) => within(p, ms, () => log('warn', `${what} did not finish within ${ms} ms`));
    api.server.close();
    await server.close();
    await step(ops.settle(), 60_000, 'running operations');
    await step(devices.flushAll().catch((e) => log('warn', 'flush failed', { error: String(e) })), 30_000, 'flushing devices');
    await step(devices.releaseUblk(cfg.ublkOnStop).catch((e) => log('warn', 'ublk release failed', { error: String(e) })), 30_000, `ublk devices (${cfg.ublkOnStop})`);
    // Devices are durable: closing the engine suspends them for the next start.
    await step(engine.close().catch((e) => log('error', 'closing the engine', { error: String((e as Error).message ?? e) })), 30_000, 'closing the engine');
    fs.rmSync(cfg.apiSocket, { force: true });
    log('info', 'stopped');
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
}
