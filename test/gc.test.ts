// Garbage collection of a shared store: what nothing can reference, older
// than the grace period, goes (failed uploads, unfinished deletes, run-out
// leases, shared-tier leftovers, temporary files); nothing with a header,
// nothing a live lease names and nothing younger than the grace period is
// touched; a dry run removes nothing; the first store error stops it.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import * as path from 'path';
import { Engine, Codec } from '../src/index';
import { FsObjectStore } from '../src/store/fs';
import { collectGarbage } from '../src/gc';
import { leaseKey, tombstoneKey } from '../src/leases';
import { keys } from '../src/format';
import { makeImage, tmpdir, rejects } from './helpers/util';

const DAY = 86_400_000;
let dir: string, img: Buffer;

test.before(() => {
  dir = tmpdir('gc');
  img = makeImage(512, 7);
  fs.writeFileSync(`${dir}/img`, img);
});
test.after(() => { fs.rmSync(dir, { recursive: true, force: true }); });

/** Backdates an object of the filesystem store (or a path) by `ms`. */
function age(p: string, ms: number): void {
  const t = new Date(Date.now() - ms);
  fs.utimesSync(p, t, t);
}
const fake = () => Array.from({ length: 32 }, () => '0123456789abcdef'[Math.floor(Math.random() * 16)]).join('');

test('only what nothing references, older than the grace period, goes; a dry run removes nothing', async () => {
  const root = `${dir}/s1`;
  const tier = `${dir}/tier1`;
  const e = await Engine.open({ store: root, cacheDir: `${dir}/c1`, sharedCacheDir: tier, profiles: false, leases: { hostId: 'gc-host', ttlMs: 60_000 } });
  const warnings: string[] = [];
  try {
    const live = (await e.importImage(`${dir}/img`, { codec: Codec.Lz4 })).id;
    const deleted = (await e.importImage(`${dir}/img`, { codec: Codec.Zstd })).id;
    // Some of the deleted layer's frames are in the shared tier (written through on upload).
    assert.ok(fs.existsSync(path.join(tier, deleted)), 'tier holds the layer');
    await e.deleteLayer(deleted);
    const store = e.store;
    const failed = fake(), young = fake(), leased = fake(), stuck = (await e.importImage(`${dir}/img`, { codec: Codec.None })).id;
    for (const [id, k] of [[failed, 'data'], [failed, 'index'], [young, 'data'], [leased, 'data']] as const) await store.put(`layers/${id}/${k}`, Buffer.alloc(1000, 1));
    await store.put(tombstoneKey(stuck), Buffer.from('{}')); // a delete that crashed before the header went
    await store.put(leaseKey('old-host'), Buffer.from(JSON.stringify({ format: 'strata-lease', version: 1, host: 'old-host', ttlMs: 60_000, written: 0, layers: [live] })));
    await store.put(leaseKey('live-host'), Buffer.from(JSON.stringify({ format: 'strata-lease', version: 1, host: 'live-host', ttlMs: 3_600_000, written: Date.now(), layers: [leased] })));
    await store.put(leaseKey('junk'), Buffer.from('junk'));
    fs.writeFileSync(`${root}/layers/.tmp-header-abc`, 'x'.repeat(100));
    // Everything old except `young` (and the live lease, written now).
    for (const k of [`layers/${failed}/data`, `layers/${failed}/index`, `layers/${leased}/data`, tombstoneKey(stuck), leaseKey('old-host'), leaseKey('junk'), 'layers/.tmp-header-abc']) age(path.join(root, k), 2 * DAY);
    for (const f of fs.readdirSync(path.join(tier, deleted))) age(path.join(tier, deleted, f), 2 * DAY);
    age(path.join(tier, deleted), 2 * DAY);
    for (const f of fs.readdirSync(`${root}/layers/${live}`)) age(`${root}/layers/${live}/${f}`, 30 * DAY); // old but live
    const before = (await store.list('')).map((o) => o.key).sort();

    const dry = await e.gc({ graceMs: DAY, onWarning: (m, f) => warnings.push(`${m} ${JSON.stringify(f)}`) });
    const want = [`layers/${failed}/data`, `layers/${failed}/index`, tombstoneKey(stuck), leaseKey('old-host'), `shared tier: ${deleted}/`, 'layers/.tmp-header-abc'].sort();
    assert.equal(dry.removed.map((i) => i.key).sort(), want);
    assert.ok(dry.dryRun);
    assert.equal((await store.list('')).map((o) => o.key).sort(), before, 'a dry run removes nothing');
    assert.ok(fs.existsSync(path.join(tier, deleted)));
    assert.ok(dry.kept.some((k) => k.layer === young && /younger/.test(k.reason)));
    assert.ok(dry.kept.some((k) => k.layer === leased && /lease/.test(k.reason)));
    assert.ok(warnings.some((w) => w.includes('junk')), 'the junk lease is warned about');

    const done = await e.gc({ graceMs: DAY, dryRun: false });
    assert.equal(done.removed.map((i) => i.key).sort(), want);
    const after = new Set((await store.list('')).map((o) => o.key));
    for (const k of want.filter((k) => !k.startsWith('shared tier') && !k.includes('.tmp-'))) assert.not.ok(after.has(k), `${k} removed`);
    assert.not.ok(fs.existsSync(`${root}/layers/.tmp-header-abc`));
    assert.not.ok(fs.existsSync(path.join(tier, deleted)));
    for (const k of [keys.header(live), keys.data(live), keys.header(stuck), `layers/${young}/data`, `layers/${leased}/data`, leaseKey('junk'), leaseKey('live-host')]) assert.ok(after.has(k), `${k} kept`);
    // The live layer still reads, on a fresh engine.
    const e2 = await Engine.open({ store: root, profiles: false });
    try { assert.ok((await (await e2.openDevice(live)).read(0, img.length)).equals(img)); } finally { await e2.close(); }
    // A second pass finds nothing more.
    assert.is((await e.gc({ graceMs: DAY, dryRun: false })).removed.length, 0);
  } finally { await e.close(); }
});

test('the grace period has a floor, and the first store error stops the sweep', async () => {
  const root = `${dir}/s2`;
  class Failing extends FsObjectStore {
    deletes = 0;
    async delete(key: string): Promise<void> {
      if (++this.deletes === 2) throw new Error('injected store failure');
      return super.delete(key);
    }
  }
  const store = new Failing(root);
  const ids = [fake(), fake(), fake()];
  for (const id of ids) { await store.put(`layers/${id}/data`, Buffer.alloc(10)); age(path.join(root, 'layers', id, 'data'), 20 * 60_000); }
  // 20 minutes old: under a 1-minute grace asked for, the 10-minute floor still lets them go...
  const r = await collectGarbage(store, { graceMs: 60_000 });
  assert.is(r.graceMs, 10 * 60_000);
  assert.is(r.removed.length, 3);
  // ...and the sweep stops at the second delete's failure.
  await rejects(collectGarbage(store, { graceMs: 60_000, dryRun: false }), /injected store failure/);
  assert.is(store.deletes, 2);
  assert.is((await store.list('layers/')).length, 2, 'one removed, then it stopped');
});

test.run();
