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

if (!hasNbdcopy) skip('daemon: nbdcopy (libnbd-bin) not installed');
else test('daemon serves imported layers over a 0600 unix socket and stops cleanly on SIGTERM', async () => {
  const dir = tmpdir('daemon');
  const img = makeImage(2048, 5);
  fs.writeFileSync(`${dir}/img`, img);
  const child = spawn(process.execPath, [path.join(__dirname, '..', 'src', 'server.js'), '--data', `${dir}/data`, '--import', `${dir}/img`], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d) => { out += d; });
  child.stderr.on('data', (d) => { out += d; });
  try {
    const t0 = Date.now();
    while (!/"msg":"imported"/.test(out) && Date.now() - t0 < 30_000) await new Promise((r) => setTimeout(r, 50));
    const m = out.match(/"layer":"([0-9a-f]{32})"/);
    assert.ok(m, `daemon did not import: ${out}`);
    const sock = `${dir}/data/nbd.sock`;
    assert.is(fs.statSync(sock).mode & 0o777, 0o600);
    const uri = `nbd+unix:///${m![1]}/dev1?socket=${sock}`;
    const r = await run('nbdcopy', [uri, `${dir}/out`]);
    assert.is(r.code, 0, r.err);
    assert.ok(fs.readFileSync(`${dir}/out`).equals(img));
    const w = Buffer.alloc(img.length, 0x42);
    fs.writeFileSync(`${dir}/w`, w);
    assert.is((await run('nbdcopy', [`${dir}/w`, uri])).code, 0);
    assert.is((await run('nbdcopy', [uri, `${dir}/out2`])).code, 0);
    assert.ok(fs.readFileSync(`${dir}/out2`).equals(w), 'writes visible to the next connection');
    const code = await new Promise<number | null>((res) => { child.on('exit', res); child.kill('SIGTERM'); });
    assert.is(code, 0, out);
    assert.match(out, /"msg":"stopped"/);
  } finally {
    child.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
