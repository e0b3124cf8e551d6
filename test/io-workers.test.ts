// The I/O workers' lifecycle (src/io/pool.ts, src/io/loop.ts): a process
// that has started them exits on process.exit() or an uncaught error (a
// worker blocked in its ring cannot be terminated: without the halt flag the
// exit hangs forever), and once the engine is closed. Like a listening
// server, running workers keep the process alive until then.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import * as path from 'path';
import { spawn } from 'child_process';
import { tmpdir } from './helpers/util';

const ROOT = path.join(__dirname, '..');

/** Runs `body` (after the engine's I/O workers are ready) in a child; resolves its exit code, or 'hung'. */
function child(dir: string, body: string): Promise<number | 'hung'> {
  const src = `
    const { Engine } = require(${JSON.stringify(path.join(ROOT, 'src/index.ts'))});
    (async () => {
      const e = await Engine.open({ store: ${JSON.stringify(`${dir}/store`)}, cacheDir: ${JSON.stringify(`${dir}/cache`)}, ioWorkers: 2 });
      await e.core.io().ready;
      console.log('ready');
      ${body}
    })();`;
  const p = spawn(process.execPath, ['-r', 'tsx/cjs', '-e', src], { cwd: ROOT, stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  p.stdout.on('data', (b) => { out += b; });
  return new Promise((resolve) => {
    const t = setTimeout(() => { p.kill('SIGKILL'); resolve('hung'); }, 30_000);
    p.on('exit', (code) => {
      clearTimeout(t);
      assert.match(out, /ready/, 'the workers started');
      resolve(code ?? -1);
    });
  });
}

test('a process with running I/O workers exits on process.exit()', async () => {
  const dir = tmpdir('iox');
  try { assert.is(await child(dir, 'process.exit(3);'), 3); } finally { fs.rmSync(dir, { recursive: true, force: true }); }
});

test('a process with running I/O workers exits on an uncaught error', async () => {
  const dir = tmpdir('iox');
  try { assert.is(await child(dir, "throw new Error('boom');"), 1); } finally { fs.rmSync(dir, { recursive: true, force: true }); }
});

test('a process with running I/O workers exits once its work ends and the engine is closed', async () => {
  const dir = tmpdir('iox');
  try { assert.is(await child(dir, 'await e.close();'), 0); } finally { fs.rmSync(dir, { recursive: true, force: true }); }
});

test.run();
