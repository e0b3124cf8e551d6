// The strata daemon (embedded default): a local filesystem object store under
// a data directory and NBD on a unix socket. Export names select devices:
//   <layer>            the device "default" on that layer
//   <layer>/<device>   a named device on that layer (opened on first use,
//                      shared by every connection that names it)
// The HTTP API, S3 and ublk frontends come with later issues.
import * as fs from 'fs';
import * as path from 'path';
import { Engine } from './engine';
import { NbdServer } from './nbd/server';
import { deviceExport } from './nbd-export';
import type { ExportResolver, NbdExport } from './nbd/export';
import type { Device } from './device';
import { parseArgs } from './cli';
import { ID_RE } from './format';

const log = (level: string, msg: string, extra: Record<string, unknown> = {}) =>
  process.stdout.write(JSON.stringify({ time: new Date().toISOString(), level, msg, ...extra }) + '\n');

const USAGE = `usage: node src/server.js [--data DIR] [--socket PATH] [--tcp PORT [--host ADDR]] [--import IMAGE]
  --data DIR      data directory (store, cache, socket); default $STRATA_DATA or ./strata-data
  --socket PATH   NBD unix socket; default DIR/nbd.sock
  --tcp PORT      also listen on TCP (loopback unless --host is given)
  --import IMAGE  import a raw image at start and print its export URI`;

export async function main(argv: string[]): Promise<void> {
  const args = parseArgs(argv);
  if (args.help) { console.log(USAGE); return; }
  const data = path.resolve(String(args.data ?? process.env.STRATA_DATA ?? 'strata-data'));
  fs.mkdirSync(data, { recursive: true, mode: 0o700 });
  const engine = await Engine.open({ store: path.join(data, 'store'), cacheDir: path.join(data, 'cache') });
  const devices = new Map<string, { dev: Device; exp: NbdExport }>();
  const opening = new Map<string, Promise<{ dev: Device; exp: NbdExport } | undefined>>();

  const resolver: ExportResolver = {
    get(name) {
      const [layer, dev = 'default', extra] = name.split('/');
      if (extra !== undefined || !ID_RE.test(layer) || !/^[A-Za-z0-9_-]{1,64}$/.test(dev)) return undefined;
      const key = `${layer}/${dev}`;
      const have = devices.get(key);
      if (have) return have.exp;
      let p = opening.get(key);
      if (!p) {
        p = engine.openDevice(layer, { id: `${layer.slice(0, 8)}-${dev}` }).then((d) => {
          const e = { dev: d, exp: deviceExport(d) };
          devices.set(key, e);
          log('info', 'device opened', { device: key });
          return e;
        }).catch((err) => { log('warn', 'cannot open device', { device: key, error: String(err.message) }); return undefined; })
          .finally(() => opening.delete(key));
        opening.set(key, p);
      }
      return p.then((e) => e?.exp);
    },
    list() { return [...devices.keys()].map((name) => ({ name })); },
  };

  const server = new NbdServer({ exports: resolver, log: (m) => log('warn', m) });
  const sock = path.resolve(String(args.socket ?? path.join(data, 'nbd.sock')));
  await server.listenUnix(sock);
  const ublk = fs.existsSync('/dev/ublk-control');
  log('info', 'strata daemon started', { data, socket: sock, frontend: 'nbd', ublk: ublk ? 'present (frontend not built yet)' : 'absent' });
  if (args.tcp) {
    const host = String(args.host ?? '127.0.0.1');
    const port = await server.listenTcp(Number(args.tcp), host);
    log('info', 'nbd tcp listening', { host, port });
  }
  if (typeof args.import === 'string') {
    const r = await engine.importImage(args.import);
    log('info', 'imported', { layer: r.id, uri: `nbd+unix:///${r.id}?socket=${sock}` });
  }
  const layers = await engine.listLayers();
  if (layers.length === 0) log('info', `no layers yet: bin/strata import IMAGE --store ${path.join(data, 'store')}, or restart with --import IMAGE`);
  else log('info', 'layers', { layers, example: `nbd+unix:///${layers[0]}/mydev?socket=${sock}` });

  let stopping = false;
  const stop = async (sig: string) => {
    if (stopping) {
      // A second signal means "now": do not wait for stuck I/O.
      log('warn', 'second signal: exiting without finishing shutdown', { signal: sig });
      process.exit(1);
    }
    stopping = true;
    log('info', 'stopping', { signal: sig });
    const within = <T>(p: Promise<T>, ms: number, what: string) => Promise.race([p, new Promise<void>((r) => setTimeout(() => {
      log('warn', `${what} did not finish within ${ms} ms`); r();
    }, ms).unref())]);
    await server.close();
    await within(Promise.all([...devices.values()].map(({ dev }) => dev.flush().catch((e) => log('warn', 'flush failed', { error: String(e) })))), 30_000, 'flushing devices');
    await within(engine.close(), 30_000, 'closing the engine');
    log('info', 'stopped');
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
}
