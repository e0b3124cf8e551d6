// An engine with an imported image, devices exported over NBD on a unix socket.
import * as fs from 'fs';
import { Engine, Codec, Device } from '../../src/index';
import { NbdServer } from '../../src/nbd/server';
import { ExportMap } from '../../src/nbd/export';
import { deviceExport } from '../../src/nbd-export';
import { NbdTls } from '../../src/nbd/tls';
import { makeImage, tmpdir } from './util';
import { OVER_TLS, TEST_PSK } from './nbd-client';

export interface Fixture {
  dir: string; engine: Engine; server: NbdServer; exports: ExportMap; sock: string;
  /** TLS offered with TEST_PSK when the suite runs over TLS (OVER_TLS); undefined otherwise. */
  tls: NbdTls | undefined;
  base: string; img: Buffer; devices: Map<string, Device>;
  addDevice(name: string, layer?: string): Promise<Device>;
  uri(name: string): string;
  close(): Promise<void>;
}

export async function nbdFixture(tag: string, blocks = 4096): Promise<Fixture> {
  const dir = tmpdir(tag);
  const img = makeImage(blocks, 11);
  fs.writeFileSync(`${dir}/img`, img);
  // Two I/O workers whatever the CPUs: connections of one device on two threads.
  const engine = await Engine.open({ store: `${dir}/store`, ioWorkers: 2 });
  const base = (await engine.importImage(`${dir}/img`, { codec: Codec.Zstd })).id;
  const exports = new ExportMap();
  let tls: NbdTls | undefined;
  if (OVER_TLS) {
    fs.writeFileSync(`${dir}/keys.psk`, `${TEST_PSK.identity}:${TEST_PSK.key.toString('hex')}\n`, { mode: 0o600 });
    tls = NbdTls.load({ mode: 'on', pskFile: `${dir}/keys.psk` });
  }
  const server = new NbdServer({ exports, tls });
  const sock = await server.listenUnix(`${dir}/nbd.sock`);
  const devices = new Map<string, Device>();
  const f: Fixture = {
    dir, engine, server, exports, sock, tls, base, img, devices,
    async addDevice(name, layer = base) {
      const d = await engine.openDevice(layer);
      devices.set(name, d);
      exports.set(name, deviceExport(d));
      return d;
    },
    uri: (name) => `nbd+unix:///${name}?socket=${sock}`,
    async close() {
      await server.close();
      await engine.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  return f;
}
