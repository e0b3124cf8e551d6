// The daemon's HTTP API end to end: start `node src/server.js`, import a
// template, create a device, write through a real NBD client (nbdcopy),
// snapshot, resume on a new device, read back; bad input gets 4xx with a
// reason; a token guards non-loopback listening.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import * as http from 'http';
import * as path from 'path';
import { spawn, spawnSync, execFile, type ChildProcess } from 'child_process';
import { randomBytes } from 'crypto';
import { tmpdir, skip, makeImage } from './helpers/util';
import { loadConfig } from '../src/config';
import { call, finished, startDaemon, waitFor } from './helpers/daemon';

const hasNbdcopy = fs.existsSync('/usr/bin/nbdcopy');
const run = (cmd: string, args: string[]) => new Promise<{ code: number; err: string }>((res) =>
  execFile(cmd, args, { timeout: 60_000 }, (e, _o, err) => res({ code: e ? 1 : 0, err: String(err) })));

if (!hasNbdcopy) skip('api: nbdcopy (libnbd-bin) not installed');
else test('API: import, device over NBD, write, snapshot, resume, read back; bad input gets 4xx', async () => {
  const dir = tmpdir('api');
  const img = makeImage(2048, 9);
  fs.writeFileSync(`${dir}/img`, img);
  let d = startDaemon(['--data', `${dir}/data`]);
  const t = { socketPath: `${dir}/data/api.sock` };
  try {
    await waitFor(d, /"msg":"strata daemon started"/);
    assert.is(fs.statSync(t.socketPath).mode & 0o777, 0o600);
    assert.is((await call(t, 'GET', '/v1/health', undefined, { 'x-request-id': 'trace-42' })).json.status, 'ok');
    assert.is((await call(t, 'GET', '/v1/ready')).status, 200);
    const spec = await call(t, 'GET', '/v1/openapi.json');
    assert.is(spec.json.openapi, '3.0.3');
    assert.ok(spec.json.paths['/v1/devices'].post);

    // Template import as an operation with progress.
    const imp = await call(t, 'POST', '/v1/templates', { path: `${dir}/img`, codec: 'lz4' });
    assert.is(imp.status, 202, imp.text);
    const impDone = await finished(t, imp.json.id);
    assert.is(impDone.state, 'succeeded', JSON.stringify(impDone));
    const tpl = impDone.result.template.id as string;
    assert.ok(impDone.progress.total > 0);
    assert.equal((await call(t, 'GET', '/v1/templates')).json.map((x: any) => x.id), [tpl]);
    assert.is((await call(t, 'GET', `/v1/templates/${tpl}`)).json.codec, 'lz4');

    // A device, written through a real NBD client.
    const dev = await call(t, 'POST', '/v1/devices', { layer: tpl, id: 'vm1', frontend: 'nbd' });
    assert.is(dev.status, 201, dev.text);
    assert.is(dev.json.frontend, 'nbd');
    assert.is(dev.json.size, img.length);
    const data = randomBytes(img.length);
    fs.writeFileSync(`${dir}/w`, data);
    const w = await run('nbdcopy', [`${dir}/w`, dev.json.nbd.uri]);
    assert.is(w.code, 0, w.err);
    assert.is((await call(t, 'GET', '/v1/devices')).json.length, 1);

    // Snapshot (an operation), resume on a new device, read back.
    const snap = await call(t, 'POST', '/v1/devices/vm1/snapshots');
    assert.is(snap.status, 202, snap.text);
    const snapDone = await finished(t, snap.json.id);
    assert.is(snapDone.state, 'succeeded', JSON.stringify(snapDone));
    const sid = snapDone.result.snapshot.id as string;
    assert.is(snapDone.result.snapshot.parent, tpl);
    assert.equal((await call(t, 'GET', '/v1/snapshots')).json.map((x: any) => x.id), [sid]);
    const dev2 = await call(t, 'POST', '/v1/devices', { layer: sid, frontend: 'auto' });
    assert.is(dev2.status, 201, dev2.text);
    assert.is(dev2.json.frontend, 'nbd', 'auto is nbd without ublk');
    const r = await run('nbdcopy', [dev2.json.nbd.uri, `${dir}/back`]);
    assert.is(r.code, 0, r.err);
    assert.ok(fs.readFileSync(`${dir}/back`).equals(data), 'resumed device holds the snapshot');

    // GC: a dry run by default, as an operation; the grace period has a floor.
    assert.is((await call(t, 'POST', '/v1/gc', { graceSeconds: 5 })).status, 400);
    assert.is((await call(t, 'POST', '/v1/gc', { dryRun: 'no' })).status, 400);
    const gc = await call(t, 'POST', '/v1/gc', {});
    assert.is(gc.status, 202, gc.text);
    const gcDone = await finished(t, gc.json.id);
    assert.is(gcDone.state, 'succeeded', JSON.stringify(gcDone));
    assert.is(gcDone.result.dryRun, true);
    assert.ok(gcDone.result.layers >= 2 && gcDone.result.leases === 1, JSON.stringify(gcDone.result)); // this daemon's own lease
    assert.is(gcDone.result.removedCount, 0);

    // The CLI's daemon commands.
    const cli = (...a: string[]) => spawnSync(process.execPath, [path.join(__dirname, '..', 'bin', 'strata'), ...a, '--api', t.socketPath], { encoding: 'utf8' });
    const ls = cli('devices');
    assert.is(ls.status, 0, ls.stderr);
    assert.match(ls.stdout, /^vm1 +nbd /m);
    const cs = cli('snapshot', 'vm1');
    assert.is(cs.status, 0, cs.stderr);
    const sid2 = cs.stdout.trim();
    assert.match(sid2, /^[0-9a-f]{32}$/);
    assert.match(cli('snapshots').stdout, new RegExp(`^${sid2} <- ${sid}$`, 'm'), 'vm1 was rebased on its first snapshot');
    const missing = cli('snapshot', 'nope');
    assert.is(missing.status, 1);
    assert.match(missing.stderr, /no device nope/);
    assert.is((await call(t, 'DELETE', `/v1/snapshots/${sid2}`)).status, 409, 'vm1 uses it');

    // Access log lines carry the request id (given or generated).
    assert.match(d.out(), /"reqId":"trace-42","method":"GET","path":"\/v1\/health","status":200/);
    assert.match(d.out(), /"reqId":"r[0-9a-z]+","method":"POST","path":"\/v1\/devices","status":201/);

    // Prometheus metrics reflect what happened.
    const met = await call(t, 'GET', '/metrics');
    assert.is(met.status, 200);
    const metric = (re: RegExp) => Number(re.exec(met.text)?.[1] ?? NaN);
    assert.is(metric(/^strata_devices (\d+)/m), 2);
    assert.ok(metric(/^strata_device_native_write_bytes_total\{device="vm1"\} (\d+)/m) + metric(/^strata_device_engine_write_bytes_total\{device="vm1"\} (\d+)/m) >= img.length, met.text.slice(0, 400));
    // Native service times form a histogram whose count is the native request count.
    const nativeWrites = metric(/^strata_device_native_writes_total\{device="vm1"\} (\d+)/m);
    assert.is(metric(/^strata_device_native_io_seconds_count\{device="vm1",op="write"\} (\d+)/m), nativeWrites);
    assert.is(metric(/^strata_device_native_io_seconds_bucket\{device="vm1",op="write",le="\+Inf"\} (\d+)/m), nativeWrites);
    assert.match(met.text, /^# TYPE strata_device_native_io_seconds histogram/m);
    assert.is(metric(/^strata_snapshot_seconds_count\{result="ok"\} (\d+)/m), 2);
    assert.ok(metric(/^strata_upload_bytes_total (\d+)/m) > 0);
    assert.is(metric(/^strata_device_lifecycle_seconds_count\{op="create"\} (\d+)/m), 2);
    assert.match(met.text, /^strata_process_process_cpu_seconds_total/m);

    // Bad input: 4xx with a reason, never a crash.
    const bad: Array<[string, string, unknown, number]> = [
      ['POST', '/v1/devices', '{not json', 400],
      ['POST', '/v1/devices', { layer: tpl, colour: 'red' }, 400],
      ['POST', '/v1/devices', { layer: '../../etc' }, 400],
      ['POST', '/v1/devices', { layer: tpl, id: '../x' }, 400],
      ['POST', '/v1/devices', { layer: tpl, id: 'vm1' }, 409],
      ['POST', '/v1/devices', { layer: 'f'.repeat(32) }, 404],
      ['POST', '/v1/devices', { layer: tpl, frontend: 'ublk' }, 501],
      ['POST', '/v1/devices', { layer: tpl, frontend: 'floppy' }, 400],
      ['POST', '/v1/templates', { path: 'relative/img' }, 400],
      ['POST', '/v1/templates', { path: `${dir}/nope` }, 404],
      ['POST', '/v1/templates', { path: dir }, 400],
      ['POST', '/v1/templates', { path: `${dir}/img`, level: 99 }, 400],
      ['POST', '/v1/devices', { layer: tpl, pad: 'x'.repeat(70_000) }, 413],
      ['GET', '/v1/devices/..%2F..%2Fetc', undefined, 400],
      ['GET', '/v1/devices/nope', undefined, 404],
      ['GET', '/v1/templates/xyz', undefined, 400],
      ['GET', '/v1/operations/zz', undefined, 400],
      ['GET', '/v2/things', undefined, 404],
      ['PUT', '/v1/devices', {}, 405],
      ['DELETE', `/v1/templates/${tpl}`, undefined, 409], // the snapshot and devices use it
      ['DELETE', `/v1/snapshots/${sid}`, undefined, 409], // a device uses it
      ['DELETE', `/v1/snapshots/${tpl}`, undefined, 409], // a template, not a snapshot
    ];
    for (const [m, p, b, want] of bad) {
      const res = await call(t, m, p, b);
      assert.is(res.status, want, `${m} ${p} ${typeof b === 'string' ? b : JSON.stringify(b)?.slice(0, 80)} -> ${res.status} ${res.text}`);
      if (want !== 405 || res.json) assert.ok(res.json?.error?.message, `${m} ${p}: a reason`);
    }

    // A restart finds devices, their writes and the layers again.
    d.child.kill('SIGTERM');
    assert.is(await d.exited, 0, d.out());
    d = startDaemon(['--data', `${dir}/data`]);
    await waitFor(d, /"msg":"strata daemon started"/);
    assert.match(d.out(), /"msg":"devices resumed"/);
    assert.equal((await call(t, 'GET', '/v1/devices')).json.map((x: any) => x.id).sort(), [dev2.json.id, 'vm1'].sort());
    const again = await run('nbdcopy', [dev.json.nbd.uri, `${dir}/again`]);
    assert.is(again.code, 0, again.err);
    assert.ok(fs.readFileSync(`${dir}/again`).equals(data), 'vm1 kept its writes across the restart');

    // Deleting devices, then the snapshot, then the template.
    assert.is((await call(t, 'DELETE', '/v1/devices/vm1')).status, 204);
    assert.is((await call(t, 'GET', '/v1/devices/vm1')).status, 404);
    assert.is((await call(t, 'DELETE', `/v1/devices/${dev2.json.id}`)).status, 204);
    assert.is((await call(t, 'DELETE', `/v1/templates/${tpl}`)).status, 409, 'the snapshot still names it');
    assert.is((await call(t, 'DELETE', `/v1/snapshots/${sid}`)).status, 409, 'the second snapshot names it');
    assert.is((await call(t, 'DELETE', `/v1/snapshots/${sid2}`)).status, 204);
    assert.is((await call(t, 'DELETE', `/v1/snapshots/${sid}`)).status, 204);
    assert.is((await call(t, 'DELETE', `/v1/templates/${tpl}`)).status, 204);
    assert.equal((await call(t, 'GET', '/v1/templates')).json, []);

    d.child.kill('SIGTERM');
    assert.is(await d.exited, 0, d.out());
    assert.match(d.out(), /"msg":"stopped"/);
    assert.not.ok(fs.existsSync(t.socketPath), 'API socket removed');
  } finally {
    d.child.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('API: DELETE of a template racing POST /v1/devices on it never both succeed (100 races); the loser gets 409 or 404', async () => {
  const dir = tmpdir('api-race');
  fs.writeFileSync(`${dir}/img`, makeImage(4, 21));
  const d = startDaemon(['--data', `${dir}/data`]);
  const t = { socketPath: `${dir}/data/api.sock` };
  try {
    await waitFor(d, /"msg":"strata daemon started"/);
    const tally = { created: 0, deleted: 0 };
    for (let i = 0; i < 100; i++) {
      const imp = await call(t, 'POST', '/v1/templates', { path: `${dir}/img` });
      const tpl = (await finished(t, imp.json.id)).result.template.id as string;
      const create = () => call(t, 'POST', '/v1/devices', { layer: tpl, id: `r${i}`, frontend: 'nbd' });
      const remove = () => call(t, 'DELETE', `/v1/templates/${tpl}`);
      const [c, del] = i % 2 ? await Promise.all([create(), remove()]) : await Promise.all([remove(), create()]).then(([a, b]) => [b, a]);
      assert.ok(!(c.status === 201 && del.status === 204), `race ${i}: both succeeded`);
      if (c.status === 201) {
        tally.created++;
        assert.is(del.status, 409, del.text);
        assert.is((await call(t, 'DELETE', `/v1/devices/r${i}`)).status, 204);
      } else {
        tally.deleted++;
        assert.is(del.status, 204, del.text);
        assert.is(c.status, 404, c.text);
      }
    }
    console.log(`100 API races: ${tally.created} created first, ${tally.deleted} deleted first`);
    assert.not.match(d.out(), /"level":"error"/, 'no server errors');
  } finally {
    d.child.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('API beyond loopback needs a token; with one, requests without it get 401', async () => {
  const dir = tmpdir('apitok');
  try {
    const noTok = startDaemon(['--data', `${dir}/a`, '--api-port', '0', '--api-host', '0.0.0.0']);
    const code = await noTok.exited;
    assert.ok(code !== 0, 'refuses to start');
    assert.match(noTok.out(), /bearer token/);

    const d = startDaemon(['--data', `${dir}/b`, '--api-port', '0', '--api-host', '0.0.0.0', '--api-token', 's3cret']);
    try {
      await waitFor(d, /"msg":"strata daemon started"/);
      const port = Number(/"api":"http:\/\/[^"]*:(\d+)"/.exec(d.out())![1]);
      const t = { host: '127.0.0.1', port };
      assert.is((await call(t, 'GET', '/v1/health')).status, 401);
      assert.is((await call(t, 'GET', '/v1/health', undefined, { authorization: 'Bearer wrong!' })).status, 401);
      assert.is((await call(t, 'GET', '/v1/health', undefined, { authorization: 'Bearer s3cret' })).status, 200);
    } finally { d.child.kill('SIGKILL'); }
  } finally { fs.rmSync(dir, { recursive: true, force: true }); }
});

test('configuration: file < environment < flags; bad settings are refused with a reason', async () => {
  const dir = tmpdir('cfg');
  try {
    fs.writeFileSync(`${dir}/c.json`, JSON.stringify({ data: `${dir}/fromfile`, maxDevices: 7, frontend: 'nbd' }));
    const c1 = loadConfig({ config: `${dir}/c.json` }, {});
    assert.is(c1.data, `${dir}/fromfile`);
    assert.is(c1.maxDevices, 7);
    const c2 = loadConfig({ config: `${dir}/c.json` }, { STRATA_MAX_DEVICES: '9' });
    assert.is(c2.maxDevices, 9);
    const c3 = loadConfig({ config: `${dir}/c.json`, 'max-devices': '11' }, { STRATA_MAX_DEVICES: '9' });
    assert.is(c3.maxDevices, 11);
    assert.is(c3.nbdSocket, `${dir}/fromfile/nbd.sock`);
    fs.writeFileSync(`${dir}/bad.json`, JSON.stringify({ dataa: 'x' }));
    assert.throws(() => loadConfig({ config: `${dir}/bad.json` }, {}), /unknown setting "dataa"/);
    assert.throws(() => loadConfig({ frontend: 'floppy' }, {}), /frontend must be/);
    assert.throws(() => loadConfig({}, { STRATA_MAX_DEVICES: '-1' }), /non-negative integer/);
  } finally { fs.rmSync(dir, { recursive: true, force: true }); }
});

test.run();
