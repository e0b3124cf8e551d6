// `node src/server.js` end to end: start on the embedded default, import,
// read and write over NBD with a real client, stop with SIGTERM.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import * as path from 'path';
import { spawn, execFile } from 'child_process';
import { tmpdir, skip, makeImage } from './helpers/util';

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

test('daemon --tcp serves NBD over TCP on loopback only, unless --host says otherwise', async () => {
  const img = makeImage(1024, 6);
  for (const host of [null, '0.0.0.0']) {
    const dir = tmpdir('daemon-tcp');
    const { child, out: log, layer } = await startDaemon(dir, img, ['--tcp', '0', ...(host ? ['--host', host] : [])]);
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
}

test.run();
