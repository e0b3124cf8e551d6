// Two hosts, one store: two daemons with their own data directories on one
// S3 store (s3rver) and one shared frame tier, working at the same time —
// import on A, devices on both, a snapshot on B resumed on A, deletes
// refused while the other host uses a layer (naming it), a delete racing a
// device create, GC running while both work (nothing referenced removed),
// and B SIGKILLed: its layers stay protected until its lease runs out.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import * as path from 'path';
import { execFile } from 'child_process';
import { randomBytes } from 'crypto';
import { tmpdir, skip, makeImage } from './helpers/util';
import { s3rverMissing, startS3Server, type S3Server } from './helpers/s3-server';
import { call, finished, startDaemon, waitFor, type Daemon } from './helpers/daemon';
import { openStore } from '../src/store/open';

const BUCKET = 'hosts';
const TTL_S = 3;
// s3rver's fixed credentials, for the daemons and for this process's own store client.
Object.assign(process.env, { AWS_ACCESS_KEY_ID: 'S3RVER', AWS_SECRET_ACCESS_KEY: 'S3RVER', AWS_EC2_METADATA_DISABLED: 'true', AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true' });
const env = process.env;
const nbdcopy = (a: string, b: string) => new Promise<{ code: number; err: string }>((res) =>
  execFile('nbdcopy', [a, b], { timeout: 60_000 }, (e, _o, err) => res({ code: e ? 1 : 0, err: String(err) })));

const missing = s3rverMissing() ?? (fs.existsSync('/usr/bin/nbdcopy') ? null : 'nbdcopy (libnbd-bin) not installed');
if (missing) skip(`hosts: ${missing}`);
else test('two daemons on one S3 store and one shared tier: devices on both, snapshot on B resumed on A, deletes and GC safe across hosts, a killed host\'s lease runs out', async () => {
  const dir = tmpdir('hosts');
  let server: S3Server | undefined;
  const daemons: Daemon[] = [];
  try {
    server = await startS3Server(path.join(dir, 's3'), BUCKET);
    const store = `s3://${BUCKET}/fleet?endpoint=${encodeURIComponent(server.endpoint)}&region=us-east-1&forcePathStyle=1&baseDelayMs=5`;
    const start = (name: string) => {
      const d = startDaemon(['--data', `${dir}/${name}`, '--store', store, '--shared-cache', `${dir}/tier`, '--host-id', `host-${name}`,
        '--lease-ttl', String(TTL_S), '--frontend', 'nbd'], env);
      daemons.push(d);
      return d;
    };
    const a = start('a'), b = start('b');
    await waitFor(a, /strata daemon started/);
    await waitFor(b, /strata daemon started/);
    const A = { socketPath: `${dir}/a/api.sock` }, B = { socketPath: `${dir}/b/api.sock` };

    // Import on A.
    const img = makeImage(2048, 17);
    fs.writeFileSync(`${dir}/img`, img);
    const imp = await finished(A, (await call(A, 'POST', '/v1/templates', { path: `${dir}/img`, codec: 'lz4' })).json.id);
    assert.is(imp.state, 'succeeded', JSON.stringify(imp));
    const tpl = imp.result.template.id as string;

    // Devices on both; B writes, snapshots; A resumes B's snapshot.
    const da = await call(A, 'POST', '/v1/devices', { layer: tpl, id: 'a1' });
    const db = await call(B, 'POST', '/v1/devices', { layer: tpl, id: 'b1' });
    assert.is(da.status, 201, da.text);
    assert.is(db.status, 201, db.text);
    assert.is((await nbdcopy(da.json.nbd.uri, `${dir}/a1.out`)).code, 0);
    assert.ok(fs.readFileSync(`${dir}/a1.out`).equals(img), 'A reads the template');
    const data = randomBytes(img.length);
    fs.writeFileSync(`${dir}/w`, data);
    assert.is((await nbdcopy(`${dir}/w`, db.json.nbd.uri)).code, 0);
    // GC on A while B snapshots: nothing referenced goes.
    const snapOp = call(B, 'POST', '/v1/devices/b1/snapshots');
    const gcOp = await call(A, 'POST', '/v1/gc', { dryRun: false, graceSeconds: 600 });
    const snap = await finished(B, (await snapOp).json.id);
    const gc = await finished(A, gcOp.json.id);
    assert.is(snap.state, 'succeeded', JSON.stringify(snap));
    assert.is(gc.state, 'succeeded', JSON.stringify(gc));
    assert.is(gc.result.removedCount, 0, `GC removed something while both hosts worked: ${JSON.stringify(gc.result.removed)}`);
    const sid = snap.result.snapshot.id as string;
    const ra = await call(A, 'POST', '/v1/devices', { layer: sid, id: 'a2' });
    assert.is(ra.status, 201, ra.text);
    assert.is((await nbdcopy(ra.json.nbd.uri, `${dir}/a2.out`)).code, 0);
    assert.ok(fs.readFileSync(`${dir}/a2.out`).equals(data), 'A reads what B wrote, from B\'s snapshot');

    // A delete on one host of a layer only the other uses is refused, naming that host; once it lets go, it goes.
    const t3 = (await finished(A, (await call(A, 'POST', '/v1/templates', { path: `${dir}/img`, codec: 'zstd' })).json.id)).result.template.id as string;
    assert.is((await call(A, 'POST', '/v1/devices', { layer: t3, id: 'a3' })).status, 201);
    const delOnB = await call(B, 'DELETE', `/v1/templates/${t3}`);
    assert.is(delOnB.status, 409, delOnB.text);
    assert.match(delOnB.text, /in use on host host-a/);
    assert.is((await call(A, 'DELETE', '/v1/devices/a3')).status, 204);
    await new Promise((r) => setTimeout(r, 200)); // A's lease is rewritten without it
    assert.is((await call(B, 'DELETE', `/v1/templates/${t3}`)).status, 204);
    assert.is((await call(A, 'DELETE', '/v1/devices/a2')).status, 204);

    // A delete racing a create on the other host: never both.
    for (let i = 0; i < 3; i++) {
      const imp2 = await finished(A, (await call(A, 'POST', '/v1/templates', { path: `${dir}/img`, codec: 'none' })).json.id);
      const t2 = imp2.result.template.id as string;
      const [c, d] = await Promise.all([call(B, 'POST', '/v1/devices', { layer: t2, id: `race${i}` }), call(A, 'DELETE', `/v1/templates/${t2}`)]);
      assert.ok(!(c.status === 201 && d.status === 204), `race ${i}: create ${c.status} and delete ${d.status} both succeeded`);
      assert.ok([201, 404, 409].includes(c.status) && [204, 409].includes(d.status), `race ${i}: ${c.status} ${c.text} / ${d.status} ${d.text}`);
      if (c.status === 201) {
        assert.is((await nbdcopy(c.json.nbd.uri, `${dir}/race.out`)).code, 0);
        assert.ok(fs.readFileSync(`${dir}/race.out`).equals(img));
      }
    }

    // B is killed holding b1 (on the template): A cannot delete it until B's lease runs out.
    b.child.kill('SIGKILL');
    await b.exited;
    assert.is((await call(A, 'DELETE', '/v1/devices/a1')).status, 204);
    const refused = await call(A, 'DELETE', `/v1/snapshots/${sid}`);
    assert.is(refused.status, 409, refused.text); // b1 was rebased onto it by its snapshot
    assert.match(refused.text, /host-b/);
    await new Promise((r) => setTimeout(r, TTL_S * 1000 + 500));
    assert.is((await call(A, 'DELETE', `/v1/snapshots/${sid}`)).status, 204, 'after the ttl the dead host protects nothing');

    // A dry-run GC sees B's run-out lease but keeps it (within the grace period), and removes nothing.
    const gc2 = await finished(A, (await call(A, 'POST', '/v1/gc', {})).json.id);
    assert.is(gc2.result.removedCount, 0);
    assert.ok(gc2.result.leases >= 2, JSON.stringify(gc2.result));

    // Orphans (a failed upload's objects) and B's run-out lease, once older than the grace period, are collected; nothing else.
    const s3 = openStore(store);
    const orphan = 'f0'.repeat(16);
    await s3.put(`layers/${orphan}/data`, Buffer.alloc(5000, 1));
    await s3.put(`layers/${orphan}/index`, Buffer.alloc(100, 2));
    // s3rver's LastModified is its files' mtime: two days back for the orphan's and B's lease.
    const age = (p: string, only = '') => {
      for (const f of fs.readdirSync(p, { recursive: true }) as string[]) {
        if (!f.includes(only)) continue;
        const t = new Date(Date.now() - 2 * 86_400_000);
        fs.utimesSync(path.join(p, f), t, t);
      }
    };
    age(path.join(dir, 's3', BUCKET, 'fleet', 'layers', orphan));
    age(path.join(dir, 's3', BUCKET, 'fleet', 'leases'), 'host-b');
    const before = (await s3.list('')).map((o) => o.key);
    const gc3 = await finished(A, (await call(A, 'POST', '/v1/gc', { dryRun: false, graceSeconds: 86_400 })).json.id);
    assert.is(gc3.state, 'succeeded', JSON.stringify(gc3));
    const removed = gc3.result.removed.map((i: { key: string }) => i.key).sort();
    assert.equal(removed, [`layers/${orphan}/data`, `layers/${orphan}/index`, 'leases/host-b'].sort(), JSON.stringify(gc3.result));
    const after = (await s3.list('')).map((o) => o.key);
    assert.equal(after.sort(), before.filter((k) => !removed.includes(k)).sort(), 'nothing else went');
    assert.ok(after.includes('leases/host-a'), 'the live host\'s lease stays');
    const again = await call(A, 'POST', '/v1/devices', { layer: tpl, id: 'a9' });
    assert.is(again.status, 201, again.text);
    assert.is((await nbdcopy(again.json.nbd.uri, `${dir}/a9.out`)).code, 0);
    assert.ok(fs.readFileSync(`${dir}/a9.out`).equals(img), 'the template still reads after GC');
  } finally {
    for (const d of daemons) d.child.kill('SIGKILL');
    await server?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
