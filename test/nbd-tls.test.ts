// NBD over TLS through the daemon, with real clients (nbdinfo, nbdcopy,
// qemu-img) and credentials this test makes: an X.509 CA, a server
// certificate, a client certificate (CN alice), and pre-shared keys for
// alice and bob. TLS required on TCP; devices owned by an identity are
// served over TCP to that identity only; unix-socket clients are local.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import * as path from 'path';
import { randomBytes } from 'crypto';
import { execFile, spawn, spawnSync, type ChildProcess } from 'child_process';
import { ApiClient } from '../src/api/client';
import { makeImage, skip, tmpdir } from './helpers/util';

const SERVER = path.join(__dirname, '..', 'src', 'server.js');
const have = (cmd: string) => spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
const run = (cmd: string, args: string[]) => new Promise<{ code: number; out: string; err: string }>((res) =>
  execFile(cmd, args, { timeout: 60_000 }, (e, out, err) => res({ code: e ? 1 : 0, out: String(out), err: String(err) })));

/** CA, server (localhost / 127.0.0.1) and client (CN alice) certificates, in the layouts nbdkit, qemu and libnbd read. */
function makeCredentials(dir: string): { server: string; alice: string; psk: string; bobPsk: string; alicePsk: string } {
  const ssl = (...a: string[]) => {
    const r = spawnSync('openssl', a, { cwd: dir, encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`openssl ${a.join(' ')}: ${r.stderr}`);
  };
  const server = path.join(dir, 'server'), alice = path.join(dir, 'alice');
  fs.mkdirSync(server); fs.mkdirSync(alice);
  ssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2', '-subj', '/CN=strata test CA');
  const sign = (name: string, cn: string, ext: string) => {
    fs.writeFileSync(path.join(dir, `${name}.ext`), ext);
    ssl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}-key.pem`, '-out', `${name}.csr`, '-subj', `/CN=${cn}`);
    ssl('x509', '-req', '-in', `${name}.csr`, '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out', `${name}-cert.pem`, '-days', '2', '-extfile', `${name}.ext`);
  };
  sign('server', 'localhost', 'subjectAltName=DNS:localhost,IP:127.0.0.1\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n');
  sign('client', 'alice', 'keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n');
  for (const d of [server, alice]) fs.copyFileSync(path.join(dir, 'ca-cert.pem'), path.join(d, 'ca-cert.pem'));
  for (const f of ['server-cert.pem', 'server-key.pem']) fs.copyFileSync(path.join(dir, f), path.join(server, f));
  for (const f of ['client-cert.pem', 'client-key.pem']) fs.copyFileSync(path.join(dir, f), path.join(alice, f));
  const aliceKey = randomBytes(32).toString('hex'), bobKey = randomBytes(32).toString('hex');
  const psk = path.join(dir, 'keys.psk'), alicePsk = path.join(dir, 'alice.psk'), bobPsk = path.join(dir, 'bob.psk');
  fs.writeFileSync(psk, `alice:${aliceKey}\nbob:${bobKey}\n`, { mode: 0o600 });
  fs.writeFileSync(alicePsk, `alice:${aliceKey}\n`, { mode: 0o600 });
  fs.writeFileSync(bobPsk, `bob:${bobKey}\n`, { mode: 0o600 });
  return { server, alice, psk, alicePsk, bobPsk };
}

async function startDaemon(dir: string, args: string[]): Promise<{ child: ChildProcess; out: () => string; port: number }> {
  const child = spawn(process.execPath, [SERVER, '--data', `${dir}/data`, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.on('data', (d) => { out += d; });
  child.stderr!.on('data', (d) => { out += d; });
  const t0 = Date.now();
  const up = args.includes('--import') ? /"msg":"imported"/ : /"msg":"strata daemon started"/;
  while (!up.test(out) && child.exitCode === null && Date.now() - t0 < 30_000) await new Promise((r) => setTimeout(r, 50));
  const m = /"msg":"nbd tcp listening"/.test(out) ? /"port":(\d+)[^\n]*"msg":"nbd tcp listening"/.exec(out) : null;
  return { child, out: () => out, port: m ? Number(m[1]) : 0 };
}

const tools = ['openssl', 'nbdinfo', 'nbdcopy', 'qemu-img'].filter((t) => !have(t));
if (tools.length) skip(`nbd-tls: ${tools.join(', ')} not installed`);
else {
  test('TLS required on TCP: X.509 (client certificates) and PSK with nbdinfo, nbdcopy and qemu-img; devices owned by an identity are served to it alone', async () => {
    const dir = tmpdir('nbd-tls');
    const cred = makeCredentials(dir);
    const img = makeImage(256, 31);
    fs.writeFileSync(`${dir}/img`, img);
    const d = await startDaemon(dir, ['--import', `${dir}/img`, '--tcp', '0', '--tls', 'require', '--tls-certificates', cred.server, '--tls-verify-peer', '--tls-psk', cred.psk]);
    try {
      assert.ok(d.port > 0, d.out());
      const layer = /"layer":"([0-9a-f]{32})"/.exec(d.out())![1];
      const api = new ApiClient(`${dir}/data/api.sock`);
      await api.request('POST', '/v1/devices', { layer, id: 'shared', frontend: 'nbd' });
      await api.request('POST', '/v1/devices', { layer, id: 'mine', frontend: 'nbd', client: 'alice' });
      const tcp = (name: string, q = '', user = '') => `nbds://${user ? `${user}@` : ''}127.0.0.1:${d.port}/${name}${q}`;
      const x509 = `?tls-certificates=${cred.alice}`;

      const plain = await run('nbdinfo', [`nbd://127.0.0.1:${d.port}/shared`]);
      assert.is(plain.code, 1, 'no plaintext NBD on TCP');
      const info = await run('nbdinfo', [tcp('shared', x509)]);
      assert.is(info.code, 0, info.err);
      assert.match(info.out, /with TLS/);
      assert.match(info.out, new RegExp(`export-size: ${img.length}`));

      // Data over TLS with certificates: write with nbdcopy, read back.
      const data = randomBytes(img.length);
      fs.writeFileSync(`${dir}/w`, data);
      assert.is((await run('nbdcopy', [`${dir}/w`, tcp('mine', x509)])).code, 0, 'alice (certificate) writes her device');
      const back = await run('nbdcopy', [tcp('mine', x509), `${dir}/back`]);
      assert.is(back.code, 0, back.err);
      assert.ok(fs.readFileSync(`${dir}/back`).equals(data), 'read back over TLS');

      // qemu's own NBD client with X.509 credentials.
      const q = await run('qemu-img', ['info', '--object', `tls-creds-x509,id=tls0,dir=${cred.alice},endpoint=client`, '--image-opts',
        `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${d.port},export=shared,tls-creds=tls0`]);
      assert.is(q.code, 0, q.err);
      assert.match(q.out, new RegExp(`virtual size: .*\\(${img.length} bytes\\)`));

      // PSK: alice reaches her device, bob does not (nor sees it listed); both reach the shared one.
      assert.is((await run('nbdinfo', [tcp('mine', `?tls-psk-file=${cred.alicePsk}`, 'alice')])).code, 0, 'alice (PSK)');
      assert.is((await run('nbdinfo', [tcp('mine', `?tls-psk-file=${cred.bobPsk}`, 'bob')])).code, 1, 'bob is refused alice\'s device');
      assert.is((await run('nbdinfo', [tcp('shared', `?tls-psk-file=${cred.bobPsk}`, 'bob')])).code, 0, 'bob reaches the shared device');
      const list = await run('nbdinfo', ['--list', '--json', tcp('', `?tls-psk-file=${cred.bobPsk}`, 'bob')]);
      assert.is(list.code, 0, list.err);
      const names = JSON.parse(list.out).exports.map((e: { 'export-name': string }) => e['export-name']);
      assert.equal(names.sort(), ['shared'], 'bob\'s list');
      const wrongKey = path.join(dir, 'wrong.psk');
      fs.writeFileSync(wrongKey, `alice:${randomBytes(32).toString('hex')}\n`);
      assert.is((await run('nbdinfo', [tcp('shared', `?tls-psk-file=${wrongKey}`, 'alice')])).code, 1, 'a wrong key is refused');

      // The unix socket is local: served without TLS, owned devices included.
      const local = await run('nbdinfo', [`nbd+unix:///mine?socket=${dir}/data/nbd.sock`]);
      assert.is(local.code, 0, local.err);
    } finally {
      d.child.kill('SIGKILL');
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  test('beyond loopback with --tls require starts without --insecure-nbd; bad TLS settings are refused with a reason', async () => {
    const dir = tmpdir('nbd-tls2');
    const cred = makeCredentials(dir);
    let d = await startDaemon(dir, ['--tcp', '0', '--host', '0.0.0.0', '--tls', 'require', '--tls-psk', cred.psk]);
    try {
      assert.ok(d.port > 0, d.out());
      assert.not.match(d.out(), /without TLS/);
    } finally { d.child.kill('SIGKILL'); }
    d = await startDaemon(dir, ['--tls', 'require']);
    await new Promise((r) => (d.child.exitCode !== null ? r(null) : d.child.on('exit', r)));
    assert.is(d.child.exitCode, 1);
    assert.match(d.out(), /--tls require needs --tls-certificates DIR or --tls-psk FILE/);
    fs.rmSync(dir, { recursive: true, force: true });
  });
}

test.run();
