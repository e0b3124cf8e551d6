// NBD over TLS against plain NBD, for one or more checkouts in the same run:
//   node -r tsx/cjs bench/tls.ts [ROOT ...]   (default: this checkout; e.g. a built worktree of an older commit as a second peer)
// Each checkout's daemon imports a 256 MiB random image and serves it on its
// unix socket with TLS offered (a pre-shared key); nbdcopy reads the whole
// device warm, in its default requests and in 4 KiB requests (16 in flight,
// one connection), over TLS (nbds+unix) and plain. STRATA_BENCH_ROUNDS
// rounds (default 2), checkouts interleaved, 3 reads per cell; prints
// seconds per read.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { randomBytes } from 'crypto';
import { spawn, spawnSync } from 'child_process';
import { importedLayer } from './daemon-log';

const roots = process.argv.slice(2).length ? process.argv.slice(2).map((r) => path.resolve(r)) : [path.join(__dirname, '..')];
const ROUNDS = Number(process.env.STRATA_BENCH_ROUNDS ?? 2);
if (spawnSync('sh', ['-c', 'command -v nbdcopy']).status !== 0) { console.error('bench/tls.ts needs nbdcopy (apt-get install libnbd-bin)'); process.exit(2); }

const nbdcopy = (args: string[]): number => {
  const t0 = performance.now();
  const r = spawnSync('nbdcopy', [...args, 'null:'], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`nbdcopy ${args.join(' ')}: ${r.stderr}`);
  return (performance.now() - t0) / 1000;
};

(async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'strata-bench-tls-'));
  try {
    fs.writeFileSync(path.join(dir, 'img'), randomBytes(256 << 20));
    const keys = path.join(dir, 'keys.psk');
    fs.writeFileSync(keys, `bench:${randomBytes(32).toString('hex')}\n`, { mode: 0o600 });
    for (let round = 1; round <= ROUNDS; round++) {
      for (const root of roots) {
        const data = path.join(dir, 'd');
        fs.rmSync(data, { recursive: true, force: true });
        fs.mkdirSync(data);
        const logFile = path.join(data, 'log');
        const out = fs.openSync(logFile, 'w');
        const child = spawn(process.execPath, [path.join(root, 'src', 'server.js'), '--data', data, '--import', path.join(dir, 'img'),
          '--tls', 'on', '--tls-psk', keys], { cwd: root, stdio: ['ignore', out, out] });
        fs.closeSync(out);
        try {
          const layer = await importedLayer(logFile, () => child.exitCode === null, () => fs.readFileSync(logFile, 'utf8').slice(-2000), 120_000);
          const sock = path.join(data, 'nbd.sock');
          const uris = { tls: `nbds+unix://bench@/${layer}/dev?socket=${sock}&tls-psk-file=${keys}`, plain: `nbd+unix:///${layer}/dev?socket=${sock}` };
          nbdcopy([uris.plain]); // warm the template cache
          for (const [kind, uri] of Object.entries(uris)) {
            const whole = [1, 2, 3].map(() => nbdcopy([uri]).toFixed(3));
            const small = [1, 2, 3].map(() => nbdcopy(['--request-size=4096', '--requests=16', '--connections=1', uri]).toFixed(3));
            console.log(`round ${round} ${path.basename(root)} ${kind}: whole device ${whole.join(' ')} s; 4 KiB requests ${small.join(' ')} s`);
          }
        } finally {
          child.kill('SIGTERM');
          await new Promise((r) => (child.exitCode === null ? child.once('exit', r) : r(null)));
        }
      }
    }
  } finally { fs.rmSync(dir, { recursive: true, force: true }); }
})().catch((e) => { console.error(e); process.exit(1); });
