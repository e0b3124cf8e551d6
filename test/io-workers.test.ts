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
import { Engine } from '../src/index';
import type { IoWorkers } from '../src/io/pool';

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


/** Runs fn with a started pool of two I/O workers (an engine's). */
async function withWorkers(name: string, fn: (io: IoWorkers) => void): Promise<void> {
  const dir = tmpdir(name);
  const e = await Engine.open({ store: `${dir}/store`, cacheDir: `${dir}/cache`, ioWorkers: 2 });
  try {
    const io = e.core.io();
    await io.ready;
    fn(io);
  } finally {
    await e.close();
  }
}

test('every I/O worker thread is an I/O flusher (reclaim there never waits on writeback through a ublk device it serves)', () => withWorkers('io-flusher', (io) => {
    const capEff = BigInt(`0x${/CapEff:\s*([0-9a-f]+)/.exec(fs.readFileSync('/proc/self/status', 'utf8'))![1]}`);
    if (!((capEff >> 24n) & 1n)) {
      // Without CAP_SYS_RESOURCE (a container) the kernel refuses: the workers say so (EPERM) and serve on.
      assert.equal(io.ioFlusher, [-1, -1]);
      console.log('SKIP: PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE, which this process lacks (the kernel lane runs it as root)');
      return;
    }
    assert.equal(io.ioFlusher, [0, 0]);
    // PF_MEMALLOC_NOIO (0x80000) in the flags field of each thread's stat: set on exactly the two workers' threads.
    const noio = fs.readdirSync('/proc/self/task').filter((t) => {
      const stat = fs.readFileSync(`/proc/self/task/${t}/stat`, 'utf8');
      const flags = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[6]);
      return (flags & 0x80000) !== 0;
    });
    assert.is(noio.length, 2, `threads with PF_MEMALLOC_NOIO: ${noio.join(',')}`);
}));

test('ublk queues are placed only where a ring has room for every tag (and a zero-copy slot for each)', () => withWorkers('io-room', (io) => {
    // Each worker: 16384 ring operations, 4096 kept for others: 12288 tags; 16384 sparse slots.
    assert.ok(io.ublkRoom(1, 12288, true), 'one queue of 12288 tags');
    assert.ok(!io.ublkRoom(1, 12289, false), 'no queue of more tags than a ring holds');
    assert.ok(io.ublkRoom(2, 12288, true), 'one such queue per worker');
    assert.ok(!io.ublkRoom(3, 12288, false), 'not a third');
    assert.ok(io.ublkRoom(4, 6144, true) && !io.ublkRoom(5, 6144, true), 'queues dealt to the least busy worker with room');
}));

test.run();
