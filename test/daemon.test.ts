// `node src/server.js` end to end: start on the embedded default, import,
// read and write over NBD with a real client, stop with SIGTERM.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import * as path from 'path';
import { spawn, execFile } from 'child_process';
import { tmpdir, skip, makeImage } from './helpers/util';
import { RawClient } from './helpers/nbd-client';
import { ApiClient } from '../src/api/client';
import { OPT, REP } from '../src/nbd/protocol';
import { metrics } from './helpers/daemon';
import { within } from '../src/deadline';

const hasNbdcopy = fs.existsSync('/usr/bin/nbdcopy');
const run = (cmd: string, args: string[]) => new Promise<{ code: number; err: string }>((res) =>
  execFile(cmd, args, { timeout: 60_000 }, (e, _o, err) => res({ code: e ? 1 : 0, err: String(err) })));

/** Starts `node src/server.js` importing `img`; resolves once it has imported (the layer id). */
async function startDaemon(dir: string, img: Buffer, extra: string[] = []) {
  fs.writeFileSync(`${dir}/img`, img);
  const child = spawn(process.execPath, [path.join(__dirname, '..', 'src', 'server.js'), '--data', `${dir}/data`, '--import', `${dir}/img`, ...extra], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d) => { out += d; });
  child.stderr.on('data', (d) => { out += d; });
  const t0 = Date.now();
  while (!/"msg":"imported"/.test(out) && Date.now() - t0 < 30_000 && child.exitCode === null) await new Promise((r) => setTimeout(r, 50));
  const m = out.match(/"layer":"([0-9a-f]{32})"/);
  return { child, out: () => out, layer: m ? m[1] : null };
}

/** The TCP addresses ("ip:port", IPv4 hex decoded) process `pid` listens on. */
function tcpListeners(pid: number): string[] {
  const inodes = new Set<string>();
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    try { const l = fs.readlinkSync(`/proc/${pid}/fd/${fd}`); const m = l.match(/^socket:\[(\d+)\]$/); if (m) inodes.add(m[1]); } catch { /* closed meanwhile */ }
  }
  const out: string[] = [];
  for (const table of ['tcp', 'tcp6']) {
    for (const line of fs.readFileSync(`/proc/net/${table}`, 'utf8').split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length < 10 || f[3] !== '0A' || !inodes.has(f[9])) continue; // 0A: LISTEN
      const [ip, port] = f[1].split(':');
      const addr = table === 'tcp' ? ip.match(/../g)!.reverse().map((h) => parseInt(h, 16)).join('.') : ip;
      out.push(`${addr}:${parseInt(port, 16)}`);
    }
  }
  return out;
}

if (!hasNbdcopy) skip('daemon: nbdcopy (libnbd-bin) not installed');
else {
// Shutdown waits for each step with a deadline: a step that finished in
// time must not be reported late when a later step is slow (its timer used
// to stay armed, so a slow engine close logged every earlier step too).
test('shutdown deadlines: a step that finished in time is never reported late; one that did not is', async () => {
  const late: string[] = [];
  await within(Promise.resolve(), 30, () => late.push('quick'));
  await within(new Promise((r) => setTimeout(r, 200)), 30, () => late.push('slow'));
  await new Promise((r) => setTimeout(r, 80));
  assert.equal(late, ['slow']);
});

test('daemon serves imported layers over a 0600 unix socket, no TCP unless asked, and stops cleanly on SIGTERM', async () => {
  const dir = tmpdir('daemon');
  const img = makeImage(2048, 5);
  const { child, out: log, layer } = await startDaemon(dir, img);
  try {
    assert.ok(layer, `daemon did not import: ${log()}`);
    const sock = `${dir}/data/nbd.sock`;
    assert.is(fs.statSync(sock).mode & 0o777, 0o600);
    assert.equal(tcpListeners(child.pid!), [], 'no TCP listener unless asked (the API is on a unix socket too)');
    const uri = `nbd+unix:///${layer}/dev1?socket=${sock}`;
    const r = await run('nbdcopy', [uri, `${dir}/out`]);
    assert.is(r.code, 0, r.err);
    assert.ok(fs.readFileSync(`${dir}/out`).equals(img));
    const w = Buffer.alloc(img.length, 0x42);
    fs.writeFileSync(`${dir}/w`, w);
    assert.is((await run('nbdcopy', [`${dir}/w`, uri])).code, 0);
    assert.is((await run('nbdcopy', [uri, `${dir}/out2`])).code, 0);
    assert.ok(fs.readFileSync(`${dir}/out2`).equals(w), 'writes visible to the next connection');
    const code = await new Promise<number | null>((res) => { child.on('exit', res); child.kill('SIGTERM'); });
    assert.is(code, 0, log());
    assert.match(log(), /"msg":"stopped"/);
  } finally {
    child.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a daemon SIGKILLed after serving a template leaves its cache to the next one: nothing is fetched again', async () => {
  const dir = tmpdir('daemon-cache');
  const img = makeImage(4096, 9); // 16 MiB
  const first = await startDaemon(dir, img, ['--store', `${dir}/store`]);
  let second: ReturnType<typeof spawn> | null = null;
  try {
    assert.ok(first.layer, `daemon did not import: ${first.out()}`);
    const sock = `${dir}/data/nbd.sock`;
    assert.is((await run('nbdcopy', [`nbd+unix:///${first.layer}/a?socket=${sock}`, `${dir}/out`])).code, 0);
    assert.ok(fs.readFileSync(`${dir}/out`).equals(img));
    await new Promise((r) => setTimeout(r, 600)); // past the cache's persist delay
    first.child.kill('SIGKILL');
    await new Promise((r) => first.child.once('exit', r));
    second = spawn(process.execPath, [path.join(__dirname, '..', 'src', 'server.js'), '--data', `${dir}/data`, '--store', `${dir}/store`], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    second.stdout!.on('data', (d) => { out += d; });
    second.stderr!.on('data', (d) => { out += d; });
    for (let i = 0; i < 300 && !/strata daemon started/.test(out); i++) await new Promise((r) => setTimeout(r, 50));
    const r = await run('nbdcopy', [`nbd+unix:///${first.layer}/b?socket=${sock}`, `${dir}/out2`]);
    assert.is(r.code, 0, `${r.err}\n${out}`);
    assert.ok(fs.readFileSync(`${dir}/out2`).equals(img), 'the restarted daemon serves the same bytes');
    const m = await metrics({ socketPath: `${dir}/data/api.sock` });
    assert.is(m.strata_cache_fetches_total, 0, 'no frame fetched from the store');
    assert.ok(m.strata_cache_restored_frames_total > 0, `frames verified from the cache the killed daemon left (${m.strata_cache_restored_frames_total})`);
    assert.is(m.strata_cache_restore_failures_total, 0);
  } finally {
    first.child.kill('SIGKILL');
    second?.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('daemon --tcp serves NBD over TCP on loopback only, unless --host says otherwise', async () => {
  const img = makeImage(1024, 6);
  for (const host of [null, '0.0.0.0']) {
    const dir = tmpdir('daemon-tcp');
    const { child, out: log, layer } = await startDaemon(dir, img, ['--tcp', '0', ...(host ? ['--host', host, '--insecure-nbd', '--nbd-by-name', 'on'] : [])]);
    try {
      assert.ok(layer, `daemon did not import: ${log()}`);
      const line = log().split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l)).find((j) => j.msg === 'nbd tcp listening');
      assert.ok(line, `no TCP listener announced: ${log()}`);
      const port = Number(line.port);
      assert.equal(tcpListeners(child.pid!), [`${host ?? '127.0.0.1'}:${port}`], host ? `on ${host} when asked` : 'only loopback by default');
      const r = await run('nbdcopy', [`nbd://127.0.0.1:${port}/${layer}/tcp1`, `${dir}/out`]);
      assert.is(r.code, 0, r.err);
      assert.ok(fs.readFileSync(`${dir}/out`).equals(img), 'the export over TCP');
    } finally {
      child.kill('SIGKILL');
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }
});

test('questions create nothing: INFO, LIST and meta-context queries of <layer>/<name> open no device; GO does, up to --nbd-by-name-max', async () => {
  const img = makeImage(256, 8);
  const dir = tmpdir('daemon-query');
  const { child, out: log, layer } = await startDaemon(dir, img, ['--nbd-by-name-max', '2']);
  const sock = `${dir}/data/nbd.sock`;
  const api = new ApiClient(`${dir}/data/api.sock`);
  try {
    assert.ok(layer, log());
    for (let i = 0; i < 20; i++) {
      const c = await RawClient.connect(sock);
      await c.greeting();
      c.sendOption(OPT.INFO, RawClient.infoRequest(`${layer}/q${i}`));
      const reps = await c.optReplies();
      assert.is(reps[reps.length - 1].type, REP.ACK, 'INFO answers with the size');
      assert.is(reps[0].data.readBigUInt64BE(2), BigInt(img.length));
      c.sendOption(OPT.STRUCTURED_REPLY); await c.optReplies();
      c.sendOption(OPT.SET_META_CONTEXT, RawClient.metaRequest(`${layer}/q${i}`, ['base:allocation']));
      assert.is((await c.optReplies()).pop()!.type, REP.ACK);
      c.sendOption(OPT.LIST); await c.optReplies();
      c.close();
    }
    assert.equal(await api.request('GET', '/v1/devices'), [], 'no device after 20 INFO-only connections');
    assert.equal(fs.readdirSync(`${dir}/data/cache/devices`).filter((n) => n.endsWith('.json')), []);
    const a = await RawClient.open(sock, `${layer}/g1`);
    const b = await RawClient.open(sock, `${layer}/g2`);
    assert.is((await a.read(0, 4096)).error, 0);
    await new Promise((r) => setTimeout(r, 100));
    await RawClient.open(sock, `${layer}/g3`).then(() => assert.unreachable('a third device by name'), (e: Error) => assert.match(e.message, /GO failed/));
    for (let i = 0; i < 50 && !/limit reached/.test(log()); i++) await new Promise((r) => setTimeout(r, 20));
    assert.match(log(), /cannot open device by name: limit reached/);
    await api.request('POST', '/v1/devices', { layer, id: 'byapi', frontend: 'nbd' }); // the API's devices have their own limit
    a.close(); b.close();
  } finally {
    child.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('NBD beyond loopback: refused without --insecure-nbd (saying why); with it, naming <layer>/<name> opens nothing unless --nbd-by-name on', async () => {
  const img = makeImage(256, 7);
  let dir = tmpdir('daemon-beyond');
  const refused = await startDaemon(dir, img, ['--tcp', '0', '--host', '0.0.0.0']);
  const code = refused.child.exitCode ?? await new Promise((r) => refused.child.on('exit', r));
  assert.is(code, 1, refused.out());
  assert.match(refused.out(), /beyond loopback: without TLS every device .* --insecure-nbd/);
  fs.rmSync(dir, { recursive: true, force: true });
  dir = tmpdir('daemon-beyond');
  const { child, out: log, layer } = await startDaemon(dir, img, ['--tcp', '0', '--host', '0.0.0.0', '--insecure-nbd']);
  try {
    assert.ok(layer, log());
    assert.match(log(), /serving NBD beyond loopback without TLS/);
    const r = await run('nbdinfo', [`nbd+unix:///${layer}/x?socket=${dir}/data/nbd.sock`]);
    assert.is(r.code, 1, 'no device is opened by name');
    assert.equal(fs.readdirSync(`${dir}/data/cache/devices`).filter((n) => n.endsWith('.json')), [], 'and none was created');
  } finally {
    child.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
}

test.run();
