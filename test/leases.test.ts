// Many hosts on one store: a layer another host's device reads through is
// not deleted (refused, naming the host); a host that crashed stops
// protecting its layers once its lease runs out; a delete racing an open
// never lets both succeed; objects in leases/ that are not leases are
// ignored (with a warning), never obeyed and never removed.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import { spawn } from 'child_process';
import { Engine, Codec } from '../src/index';
import { leaseKey, LeaseKeeper, newHostId } from '../src/leases';
import { keys } from '../src/format';
import { makeImage, tmpdir, rejects } from './helpers/util';

let dir: string, img: Buffer;
const TTL = 1500;
const hosts: Engine[] = [];
const host = async (name: string, warnings?: string[]) => {
  const e = await Engine.open({ store: `${dir}/store`, cacheDir: `${dir}/${name}`, profiles: false,
    leases: { hostId: name, ttlMs: TTL, onWarning: (m, f) => warnings?.push(`${m} ${JSON.stringify(f)}`) } });
  hosts.push(e);
  return e;
};
const importLayer = async (e: Engine) => (await e.importImage(`${dir}/img`, { codec: Codec.Lz4 })).id;

test.before(() => {
  dir = tmpdir('leases');
  img = makeImage(512, 3);
  fs.writeFileSync(`${dir}/img`, img);
});
test.after(async () => {
  for (const e of hosts) await e.close().catch(() => {});
  fs.rmSync(dir, { recursive: true, force: true });
});

test('a layer another host reads through cannot be deleted (the holder is named); once it lets go, it can', async () => {
  const a = await host('host-a'), b = await host('host-b');
  const layer = await importLayer(a);
  const d = await b.openDevice(layer);
  await rejects(a.deleteLayer(layer), /in use on host host-b .*pid \d+/);
  assert.ok((await d.read(0, img.length)).equals(img), 'host B still reads it');
  assert.not.ok(await a.store.head(`layers/${layer}/tombstone`), 'the refused delete took its tombstone back');
  await b.closeDevice(d);
  await new Promise((r) => setTimeout(r, 100)); // B's lease is rewritten without it
  await a.deleteLayer(layer);
  assert.not.ok(await a.store.head(keys.header(layer)));
  await rejects(b.openDevice(layer), /not found/);
});

test('a host that crashed protects its layers until its lease runs out, then no longer', async () => {
  const a = await host('host-c');
  const layer = await importLayer(a);
  const child = spawn(process.execPath, ['-r', 'tsx/cjs', `${__dirname}/helpers/lease-child.ts`, `${dir}/store`, `${dir}/crashed`, layer, 'crashed-host', String(TTL)], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on('data', (x) => { if (String(x).includes('open')) resolve(); });
    child.on('exit', (c) => reject(new Error(`child exited ${c}`)));
  });
  child.kill('SIGKILL');
  await new Promise((r) => child.once('close', r));
  await rejects(a.deleteLayer(layer), /in use on host crashed-host/);
  await new Promise((r) => setTimeout(r, TTL + 200));
  await a.deleteLayer(layer);
  assert.not.ok(await a.store.head(keys.header(layer)));
  assert.ok(await a.store.head(leaseKey('crashed-host')), 'the expired lease is left for GC, not deleted by a delete');
});

test('a delete racing an open on another host: never both succeed, and an open that wins reads its data', async () => {
  const a = await host('host-d'), b = await host('host-e');
  let both = 0, opened = 0, deleted = 0;
  for (let i = 0; i < 20; i++) {
    const layer = await importLayer(a);
    const [o, del] = await Promise.allSettled([b.openDevice(layer), a.deleteLayer(layer)]);
    if (o.status === 'fulfilled' && del.status === 'fulfilled') both++;
    if (o.status === 'fulfilled') {
      opened++;
      assert.ok((await o.value.read(0, img.length)).equals(img), `race ${i}: the device that opened reads its layer`);
      await b.closeDevice(o.value);
    }
    if (del.status === 'fulfilled') deleted++;
  }
  assert.is(both, 0, 'a delete and an open both succeeded');
  assert.is(opened + deleted, 20, 'one of them wins every race (an open that sees a delete under way waits it out)');
  console.log(`  20 races: ${opened} opens won, ${deleted} deletes won`);
});

test('objects in leases/ that are not leases are ignored with a warning, never removed', async () => {
  const warnings: string[] = [];
  const a = await host('host-f', warnings);
  const layer = await importLayer(a);
  await a.store.put(leaseKey('garbage'), Buffer.from('{not json'));
  await a.store.put(leaseKey('liar'), Buffer.from(JSON.stringify({ format: 'strata-lease', version: 1, host: 'someone-else', ttlMs: 1e9, written: Date.now(), layers: [layer] })));
  await a.deleteLayer(layer);
  assert.ok(warnings.some((w) => w.includes('garbage') && w.includes('not JSON')), warnings.join('\n'));
  assert.ok(warnings.some((w) => w.includes('liar')), warnings.join('\n'));
  assert.ok(await a.store.head(leaseKey('garbage')) && await a.store.head(leaseKey('liar')), 'left alone');
});

test('a saved durable device keeps its layer from being deleted on its own host', async () => {
  const a = await host('host-g');
  const layer = await importLayer(a);
  const d = await a.openDevice(layer, { id: 'saved1', durable: true });
  await a.suspendDevice(d);
  await rejects(a.deleteLayer(layer), /saved device saved1/);
  const r = await a.resumeDevice('saved1');
  assert.ok((await r.read(0, img.length)).equals(img));
  await a.closeDevice(r);
});

test('host ids made from any hostname are valid ones (a VM without a hostname says "(none)")', () => {
  for (const name of ['(none)', '', '---', 'web-1.example.com', 'ünïcode host', 'x'.repeat(100)]) {
    const id = newHostId(name);
    assert.ok(new LeaseKeeper(hosts[0]?.store ?? ({} as never), () => new Set(), { hostId: id }).host === id, `${JSON.stringify(name)} -> ${id}`);
  }
  assert.match(newHostId('(none)'), /^none-[0-9a-f]{8}$/);
});

test.run();
