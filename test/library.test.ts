// The README's embedding example, through the package entry (`require('strata')`
// resolves to src/index.js): engine, durable device, NBD server, snapshot, resume.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import { makeImage, tmpdir } from './helpers/util';
import { RawClient } from './helpers/nbd-client';
import { CMD } from '../src/nbd/protocol';
// eslint-disable-next-line @typescript-eslint/no-var-requires
const strata = require('../src/index.js') as typeof import('../src/index');

test('embedding: import, durable device served over NBD, snapshot, resume after the engine restarts', async () => {
  const dir = tmpdir('library');
  const img = makeImage(1024, 17);
  fs.writeFileSync(`${dir}/rootfs.img`, img);
  try {
    let engine = await strata.Engine.open({ store: `${dir}/store`, cacheDir: `${dir}/cache`, cache: { maxBytes: 64 << 20 }, sharedCacheDir: `${dir}/nfs` });
    const { id: template } = await engine.importImage(`${dir}/rootfs.img`, { codec: strata.Codec.Zstd });
    const dev = await engine.openDevice(template, { id: 'sandbox-1', durable: true });
    const exports = new strata.ExportMap();
    exports.set('sandbox-1', strata.deviceExport(dev));
    const nbd = new strata.NbdServer({ exports });
    const sock = await nbd.listenUnix(`${dir}/nbd.sock`);
    const c = await RawClient.open(sock, 'sandbox-1');
    assert.is((await c.write(8192, Buffer.alloc(4096, 0x5c))).error, 0);
    assert.is((await c.request(CMD.FLUSH, 0, 0)).error, 0);
    c.close();
    const snap = await dev.snapshot();
    await nbd.close();
    await engine.close(); // suspends the durable device
    engine = await strata.Engine.open({ store: `${dir}/store`, cacheDir: `${dir}/cache` });
    const back = await engine.resumeDevice('sandbox-1');
    assert.ok((await back.read(8192, 4096)).every((x) => x === 0x5c));
    const resumed = await engine.openDevice(snap.id);
    const want = Buffer.from(img); want.fill(0x5c, 8192, 12288);
    assert.ok((await resumed.read(0, img.length)).equals(want));
    await engine.closeDevice(back);
    await engine.close();
  } finally { fs.rmSync(dir, { recursive: true, force: true }); }
});

test.run();
