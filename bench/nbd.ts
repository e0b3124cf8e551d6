// strata NBD benchmark: `npm run bench:nbd`.
//
// Starts, on one base image and in one run, the strata daemon and the
// incumbent NBD servers, each on its own unix socket, and drives every one of
// them with fio's libnbd engine. Prints markdown tables (stdout): the results,
// strata's ratio to each peer, and the targets; progress goes to stderr.
// See bench/nbd.md for what each peer is and how the run is kept fair.
//
// Peers (STRATA_BENCH_PEERS picks a comma-separated subset, default all):
//   strata        node src/server.js --data TMP/strata --import base.raw; a fresh device per cell (the last one deleted)
//   nbdkit-file   nbdkit file plugin on a raw copy of the base (no copy-on-write: the ceiling)
//   nbdkit-cow4k  nbdkit cow filter over the read-only base, cow-block-size=4096 (restarted per cell)
//   nbdkit-cow64k the same with the filter's default 64 KiB block (restarted per cell)
//   qemu-threads  qemu-nbd on a qcow2 overlay backed by the base, --aio=threads (overlay recreated per cell)
//   qemu-uring    the same with --aio=io_uring
//   strata-prev   with STRATA_BENCH_PREV=DIR: the strata daemon of another checkout (built), e.g. the
//                 commit before a data-plane change, run side by side as a peer
//
// Knobs (environment):
//   STRATA_BENCH_SECONDS    seconds per cell (default 5)
//   STRATA_BENCH_IMAGE_MB   base image size (default 1024)
//   STRATA_BENCH_CONTENT_MB real files copied into the ext4 image (default 60% of the image)
//   STRATA_BENCH_IMAGE      use this raw image as the base instead of building one
//   STRATA_BENCH_TESTS      subset of randread,randwrite,randrw,read,write (the default), or coldread:
//                           4k randread with the page cache dropped before each cell (root only)
//   STRATA_BENCH_CONNS      connection counts to run (default 1,2)
//   STRATA_BENCH_TMP        parent of the temporary directory (default os.tmpdir())
//   STRATA_BENCH_KEEP=1     keep the temporary directory (and the daemon log) at the end
//   STRATA_BENCH_SYNC=0     do not run `sync` before each cell
//   STRATA_BENCH_JSON=FILE  also write the raw results as JSON
//   STRATA_BENCH_CPU_PROF=DIR  run the daemon under `node --cpu-prof --cpu-prof-dir DIR`
//   STRATA_BENCH_ROUNDS     interleaved rounds per cell, best run kept (default 2; the machine's run-to-run spread is ±15 %)
//   STRATA_BENCH_RETRIES    re-runs of a cell during which other processes used > 0.3 CPU (default 2)
import * as fs from 'fs';
import * as os from 'os';
import * as net from 'net';
import * as path from 'path';
import { spawn, spawnSync, type ChildProcess } from 'child_process';
import { medianOfRounds } from './rounds';
import { ApiClient } from '../src/api/client';
import { importedLayer } from './daemon-log';
import { StrataError } from '../src/errors';

const ROOT = path.join(__dirname, '..');
const MiB = 1024 * 1024;
const envNum = (k: string, d: number): number => {
  const v = process.env[k];
  if (v === undefined || v === '') return d;
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0) throw new Error(`${k}=${v}: expected a positive number`);
  return n;
};
const envList = (k: string): string[] | null => {
  const v = process.env[k];
  return v ? v.split(',').map((s) => s.trim()).filter(Boolean) : null;
};

const SECONDS = envNum('STRATA_BENCH_SECONDS', 5);
const IMAGE_MB = Math.floor(envNum('STRATA_BENCH_IMAGE_MB', 1024));
const CONTENT_MB = envNum('STRATA_BENCH_CONTENT_MB', Math.floor(IMAGE_MB * 0.6));
const CONNS = (envList('STRATA_BENCH_CONNS') ?? ['1', '2']).map(Number);
const KEEP = process.env.STRATA_BENCH_KEEP === '1';
const SYNC = process.env.STRATA_BENCH_SYNC !== '0';
const CPU_PROF = process.env.STRATA_BENCH_CPU_PROF;
/** Interleaved rounds per cell; each cell reports its best undisturbed run. */
const ROUNDS = Math.floor(envNum('STRATA_BENCH_ROUNDS', 2));
const RETRIES = (() => { const v = Number(process.env.STRATA_BENCH_RETRIES ?? 2); return Number.isInteger(v) && v >= 0 ? v : 2; })();
/** CPUs used by other processes during a cell above which it counts as disturbed. */
const CONTENDED = 0.3;
const CLK_TCK = (() => {
  const r = spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' });
  const n = Number(String(r.stdout ?? '').trim());
  return Number.isFinite(n) && n > 0 ? n : 100;
})();

const T0 = performance.now();
const log = (m: string): void => {
  process.stderr.write(`[bench:nbd ${((performance.now() - T0) / 1000).toFixed(1).padStart(6)}s] ${m}\n`);
};
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
/** Set on SIGINT/SIGTERM: nothing new is started after it. */
let interrupted = false;

// ------------------------------------------------------------ child processes

/** A child process whose output goes to a log file; killed when the bench exits. */
class Child {
  readonly proc: ChildProcess;
  readonly exited: Promise<void>;
  exitInfo: string | null = null;
  private static all = new Set<Child>();

  constructor(readonly name: string, cmd: string, args: string[], readonly logFile: string,
    opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}) {
    if (interrupted) throw new Error('interrupted');
    const fd = fs.openSync(logFile, 'a');
    try {
      this.proc = spawn(cmd, args, { cwd: opts.cwd, env: opts.env ?? process.env, stdio: ['ignore', fd, fd] });
    } finally { fs.closeSync(fd); }
    Child.all.add(this);
    this.exited = new Promise<void>((resolve) => {
      this.proc.once('error', (e) => { this.exitInfo = `could not start ${cmd}: ${e.message}`; Child.all.delete(this); resolve(); });
      this.proc.once('exit', (code, sig) => {
        this.exitInfo ??= sig ? `killed by ${sig}` : `exited with code ${code}`;
        Child.all.delete(this);
        resolve();
      });
    });
  }

  get pid(): number | undefined { return this.proc.pid; }
  get alive(): boolean { return this.exitInfo === null && this.proc.exitCode === null && this.proc.signalCode === null; }

  /** The last lines of the child's log, for error messages. */
  tail(lines = 12): string {
    try {
      const t = fs.readFileSync(this.logFile, 'utf8').trimEnd().split('\n');
      return t.slice(-lines).map((l) => `    ${l}`).join('\n');
    } catch { return '    (no log)'; }
  }

  /** Sends `sig`, waits up to `graceMs`, then SIGKILL. */
  async stop(sig: NodeJS.Signals = 'SIGTERM', graceMs = 5000): Promise<void> {
    if (!this.alive) { await this.exited; return; }
    try { this.proc.kill(sig); } catch { /* gone */ }
    let timer: NodeJS.Timeout | undefined;
    const timedOut = await Promise.race([
      this.exited.then(() => false),
      new Promise<boolean>((r) => { timer = setTimeout(() => r(true), graceMs); }),
    ]);
    clearTimeout(timer);
    if (timedOut) {
      log(`${this.name} did not stop within ${graceMs} ms of ${sig}: SIGKILL`);
      try { this.proc.kill('SIGKILL'); } catch { /* gone */ }
      await this.exited;
    }
  }

  static async stopAll(): Promise<void> { await Promise.all([...Child.all].map((c) => c.stop('SIGTERM', 15000))); }
  static killAllSync(): void {
    for (const c of Child.all) { try { c.proc.kill('SIGKILL'); } catch { /* gone */ } }
  }
}

/** Waits until an NBD server on `sock` sends its greeting (or the child dies). */
async function waitNbd(sock: string, child: Child, timeoutMs = 30000): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    if (!child.alive) {
      await child.exited;
      throw new Error(`${child.name} ${child.exitInfo}:\n${child.tail()}`);
    }
    if (fs.existsSync(sock) && await greets(sock)) return;
    if (performance.now() > deadline) throw new Error(`${child.name} did not answer on ${sock} within ${timeoutMs / 1000} s:\n${child.tail()}`);
    await sleep(50);
  }
}

function greets(sock: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(sock);
    let got = Buffer.alloc(0);
    const done = (ok: boolean) => { s.destroy(); resolve(ok); };
    s.setTimeout(2000, () => done(false));
    s.on('error', () => done(false));
    let greeted = false;
    s.on('data', (b: Buffer) => {
      got = Buffer.concat([got, b]);
      if (greeted || got.length < 18) return; // NBDMAGIC, IHAVEOPT, u16 flags
      greeted = true;
      if (got.subarray(0, 8).toString('latin1') !== 'NBDMAGIC') { done(false); return; }
      // Leave politely (client flags, then NBD_OPT_ABORT) so servers log no error.
      const bye = Buffer.alloc(4 + 16);
      bye.writeUInt32BE(3, 0); // FIXED_NEWSTYLE | NO_ZEROES
      got.copy(bye, 4, 8, 16); // IHAVEOPT
      bye.writeUInt32BE(2, 12); // NBD_OPT_ABORT, length 0
      s.write(bye);
      setTimeout(() => done(true), 20);
    });
  });
}

// ------------------------------------------------------------ CPU accounting

/** utime+stime of a process (all its threads, including io_uring workers), seconds. */
function procCpu(pid: number | undefined): number {
  if (!pid) return NaN;
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    // f[0] is field 3 (state): utime is field 14, stime 15.
    return (Number(f[11]) + Number(f[12])) / CLK_TCK;
  } catch { return NaN; }
}

/** CPU of this process's waited-for children (fio and its job processes), seconds. */
function childrenCpu(): number {
  try {
    const s = fs.readFileSync('/proc/self/stat', 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return (Number(f[13]) + Number(f[14])) / CLK_TCK; // cutime, cstime
  } catch { return NaN; }
}

/** Busy CPU-seconds of the whole machine. */
function machineBusy(): number {
  try {
    const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
    return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / CLK_TCK;
  } catch { return NaN; }
}

// ------------------------------------------------------------ the base image

function listFiles(roots: string[], budget: number): Array<{ src: string; size: number }> {
  const out: Array<{ src: string; size: number }> = [];
  let total = 0;
  for (const root of roots) {
    const stack = [root];
    while (stack.length && total < budget) {
      const dir = stack.shift()!;
      let names: fs.Dirent[];
      try { names = fs.readdirSync(dir, { withFileTypes: true }); } catch { continue; }
      names.sort((a, b) => a.name.localeCompare(b.name));
      for (const d of names) {
        const p = path.join(dir, d.name);
        if (d.isDirectory()) { stack.push(p); continue; }
        if (!d.isFile()) continue; // symlinks, sockets, …
        let size = 0;
        try { size = fs.statSync(p).size; } catch { continue; }
        if (size === 0 || size > 64 * MiB || total + size > budget) continue;
        out.push({ src: p, size });
        total += size;
      }
    }
  }
  return out;
}

/** A raw ext4 image of IMAGE_MB holding about CONTENT_MB of real files. */
function buildImage(dir: string): { file: string; what: string } {
  const given = process.env.STRATA_BENCH_IMAGE;
  if (given) {
    const st = fs.statSync(given);
    if (st.size % 4096) throw new Error(`STRATA_BENCH_IMAGE ${given}: size ${st.size} is not a multiple of 4096`);
    const file = path.join(dir, 'base.raw');
    cpSparse(given, file);
    return { file, what: `${given} (${(st.size / MiB).toFixed(0)} MiB)` };
  }
  const src = path.join(dir, 'src');
  const files = listFiles(['/usr/lib/x86_64-linux-gnu', '/usr/lib', '/usr/share'], CONTENT_MB * MiB);
  let bytes = 0;
  for (const f of files) {
    const dest = path.join(src, f.src);
    try {
      fs.mkdirSync(path.dirname(dest), { recursive: true });
      fs.copyFileSync(f.src, dest);
      bytes += f.size;
    } catch { /* unreadable: skip */ }
  }
  log(`copied ${files.length} files (${(bytes / MiB).toFixed(0)} MiB) for the image`);
  const file = path.join(dir, 'base.raw');
  const r = spawnSync('mkfs.ext4', ['-q', '-F', '-d', src, file, `${IMAGE_MB}M`], { encoding: 'utf8', env: { ...process.env, PATH: `${process.env.PATH}:/usr/sbin:/sbin` } });
  fs.rmSync(src, { recursive: true, force: true });
  if (r.status !== 0) throw new Error(`mkfs.ext4 failed: ${r.error?.message ?? r.stderr}`);
  return { file, what: `${IMAGE_MB} MiB ext4 (mkfs.ext4 -d) holding ${(bytes / MiB).toFixed(0)} MiB of files from /usr/lib` };
}

function cpSparse(from: string, to: string): void {
  const r = spawnSync('cp', ['--sparse=always', from, to], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`cp ${from} ${to}: ${r.stderr}`);
}

/** The strata commit measured, with a note when the work tree differs from it. */
function gitState(): string {
  const rev = spawnSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: ROOT, encoding: 'utf8' });
  if (rev.status !== 0) return 'unknown';
  const dirty = spawnSync('git', ['status', '--porcelain', '--untracked-files=no', '--', 'src', 'native', 'workers', 'assembly'], { cwd: ROOT, encoding: 'utf8' });
  return `${String(rev.stdout).trim()}${String(dirty.stdout ?? '').trim() ? ' + uncommitted changes in src/native/workers/assembly' : ''}`;
}

/** Waits (up to `maxSeconds`) until the machine is nearly idle for a second. */
async function waitQuiet(maxSeconds: number): Promise<void> {
  const end = performance.now() + maxSeconds * 1000;
  while (performance.now() < end) {
    const b0 = machineBusy();
    await sleep(1000);
    if (machineBusy() - b0 < 0.2) return;
  }
}

/** `sync` before a cell (forced for cold cells: only clean pages can be dropped). */
function syncDisks(force = false): void {
  if (!SYNC && !force) return;
  const t = performance.now();
  spawnSync('sync', { stdio: 'ignore' });
  const ms = performance.now() - t;
  if (ms > 1000) log(`  (sync took ${(ms / 1000).toFixed(1)} s)`);
}

// ------------------------------------------------------------ peers

interface Peer {
  key: string;
  label: string;
  /** Starts the server (and whatever it needs once). */
  start(): Promise<void>;
  /** A URI on a fresh copy-on-write overlay for one cell. */
  fresh(cell: string): Promise<string>;
  /** PID to charge server CPU to. */
  pid(): number | undefined;
  stop(): Promise<void>;
  failed?: string;
}

const uri = (exp: string, sock: string) => `nbd+unix:///${exp}?socket=${sock}`;

class StrataPeer implements Peer {
  private child?: Child;
  private layer = '';
  private sock = '';
  private n = 0;
  private last?: string;
  /** root: the checkout whose daemon runs (another one for strata-prev). */
  constructor(private readonly dir: string, private readonly base: string, private readonly root = ROOT,
    readonly key = 'strata', readonly label = 'strata') {}

  async start(): Promise<void> {
    const data = path.join(this.dir, this.key);
    this.sock = path.join(data, 'nbd.sock');
    const logFile = path.join(this.dir, `${this.key}.log`);
    const nodeArgs = CPU_PROF ? ['--cpu-prof', '--cpu-prof-dir', path.resolve(CPU_PROF)] : [];
    this.child = new Child(`${this.key} daemon`, process.execPath, [...nodeArgs, path.join(this.root, 'src', 'server.js'), '--data', data, '--import', this.base], logFile, { cwd: this.root });
    const child = this.child;
    this.layer = await importedLayer(logFile, () => child.alive, () => `${child.exitInfo ?? 'running'}\n${child.tail()}`);
    await waitNbd(this.sock, this.child);
    log(`strata: imported layer ${this.layer}`);
  }

  async fresh(cell: string): Promise<string> {
    if (!this.child?.alive) throw new Error(`strata daemon is not running (${this.child?.exitInfo ?? 'never started'}):\n${this.child?.tail() ?? ''}`);
    // The last cell's device goes, overlay and all, as the other peers'
    // overlays do between cells. A new device name opens a new private
    // overlay on the same layer; the layer's template cache is shared, so it
    // stays warm.
    if (this.last) await this.deleteDevice(this.last);
    const name = `${cell.replace(/[^A-Za-z0-9_-]/g, '-').slice(0, 56)}-${this.n++}`;
    this.last = `${this.layer.slice(0, 8)}-${name}`;
    return uri(`${this.layer}/${name}`, this.sock);
  }

  /** DELETE /v1/devices/:id through the daemon's API (ENOENT: the cell never connected). */
  private async deleteDevice(id: string): Promise<void> {
    const api = new ApiClient(path.join(this.dir, this.key, 'api.sock'));
    await api.request('DELETE', `/v1/devices/${id}`).catch((e: StrataError) => { if (e.code !== 'ENOENT') throw e; });
  }

  pid() { return this.child?.pid; }
  async stop(): Promise<void> { await this.child?.stop(CPU_PROF ? 'SIGINT' : 'SIGTERM', 30000); }
}

/** nbdkit `file` plugin on a raw copy: no overlay at all. */
class NbdkitFilePeer implements Peer {
  key = 'nbdkit-file';
  label = 'nbdkit file (raw copy)';
  private child?: Child;
  private sock = '';
  constructor(private readonly dir: string, private readonly base: string) {}
  async start(): Promise<void> {
    const file = path.join(this.dir, 'file-copy.raw');
    cpSparse(this.base, file);
    this.sock = path.join(this.dir, 'nbdkit-file.sock');
    fs.rmSync(this.sock, { force: true });
    this.child = new Child('nbdkit file', 'nbdkit', ['--foreground', '--exit-with-parent', '--unix', this.sock, 'file', file],
      path.join(this.dir, 'nbdkit-file.log'));
    await waitNbd(this.sock, this.child);
  }
  async fresh(): Promise<string> {
    if (!this.child?.alive) throw new Error(`nbdkit file is not running (${this.child?.exitInfo}):\n${this.child?.tail() ?? ''}`);
    return uri('', this.sock);
  }
  pid() { return this.child?.pid; }
  async stop(): Promise<void> { await this.child?.stop(); }
}

/** nbdkit `cow` filter over the read-only base; restarted for a fresh overlay. */
/** A peer whose overlay is thrown away by restarting it: every cell starts fresh. */
abstract class RestartedPeer implements Peer {
  abstract key: string;
  abstract label: string;
  protected abstract sock: string;
  abstract start(): Promise<void>;
  abstract stop(): Promise<void>;
  abstract pid(): number | undefined;
  async fresh(): Promise<string> {
    await this.stop();
    await this.start();
    return uri('', this.sock);
  }
}

class NbdkitCowPeer extends RestartedPeer {
  key: string;
  label: string;
  private child?: Child;
  protected sock: string;
  private tmp: string;
  constructor(private readonly dir: string, private readonly base: string, private readonly block: number) {
    super();
    this.key = `nbdkit-cow${block / 1024}k`;
    this.label = `nbdkit cow ${block / 1024}k${block === 65536 ? ' (default)' : ''}`;
    this.sock = path.join(dir, `${this.key}.sock`);
    this.tmp = path.join(dir, `${this.key}-tmp`);
  }
  async start(): Promise<void> {
    fs.mkdirSync(this.tmp, { recursive: true });
    fs.rmSync(this.sock, { force: true }); // nbdkit leaves its socket behind
    // The filter keeps its overlay in a deleted temporary file under $TMPDIR.
    this.child = new Child(this.key, 'nbdkit', ['--foreground', '--exit-with-parent', '--unix', this.sock,
      '--filter=cow', 'file', this.base, `cow-block-size=${this.block}`], path.join(this.dir, `${this.key}.log`),
    { env: { ...process.env, TMPDIR: this.tmp } });
    await waitNbd(this.sock, this.child);
  }
  pid() { return this.child?.pid; }
  // Exiting frees the whole temporary overlay, which can take seconds after a write test.
  async stop(): Promise<void> { await this.child?.stop('SIGTERM', 30000); }
}

/** qemu-nbd on a qcow2 overlay backed by the base; the overlay is recreated per cell. */
class QemuPeer extends RestartedPeer {
  key: string;
  label: string;
  private child?: Child;
  protected sock: string;
  private overlay: string;
  constructor(private readonly dir: string, private readonly base: string, private readonly aio: 'threads' | 'io_uring') {
    super();
    this.key = aio === 'threads' ? 'qemu-threads' : 'qemu-uring';
    this.label = `qemu-nbd qcow2 aio=${aio}`;
    this.sock = path.join(dir, `${this.key}.sock`);
    this.overlay = path.join(dir, `${this.key}.qcow2`);
  }
  async start(): Promise<void> {
    fs.rmSync(this.overlay, { force: true });
    fs.rmSync(this.sock, { force: true });
    const r = spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', this.base, '-F', 'raw', this.overlay], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`qemu-img create failed: ${r.error?.message ?? r.stderr}`);
    // -t: keep serving after a client disconnects; -e 2: two connections at once.
    this.child = new Child(this.key, 'qemu-nbd', ['-k', this.sock, '-t', '-e', '2', '-f', 'qcow2',
      '--cache=writeback', `--aio=${this.aio}`, this.overlay], path.join(this.dir, `${this.key}.log`));
    await waitNbd(this.sock, this.child);
  }
  pid() { return this.child?.pid; }
  async stop(): Promise<void> { await this.child?.stop('SIGTERM', 30000); fs.rmSync(this.overlay, { force: true }); }
}

// ------------------------------------------------------------ fio

interface Test { key: string; label: string; rw: string; bs: string; qd: number; mix?: number; small: boolean; cachedRead: boolean; cold?: boolean }
const ALL_TESTS: Test[] = [
  { key: 'randread', label: '4k randread', rw: 'randread', bs: '4k', qd: 32, small: true, cachedRead: true },
  { key: 'randwrite', label: '4k randwrite', rw: 'randwrite', bs: '4k', qd: 32, small: true, cachedRead: false },
  { key: 'randrw', label: '4k randrw 70/30', rw: 'randrw', mix: 70, bs: '4k', qd: 32, small: true, cachedRead: false },
  { key: 'read', label: '128k seq read', rw: 'read', bs: '128k', qd: 8, small: false, cachedRead: true },
  { key: 'write', label: '128k seq write', rw: 'write', bs: '128k', qd: 8, small: false, cachedRead: false },
  // Only by name: every peer's data has to come from the disk (no target; see bench/README.md).
  { key: 'coldread', label: '4k randread, cold page cache', rw: 'randread', bs: '4k', qd: 32, small: false, cachedRead: false, cold: true },
];
const DEFAULT_TESTS = ['randread', 'randwrite', 'randrw', 'read', 'write'];

/** Drops the whole machine's clean page cache (after the sync before each cell), so a cell starts cold. */
function dropCleanPageCache(): void {
  fs.writeFileSync('/proc/sys/vm/drop_caches', '1');
}

interface FioResult { ios: number; iops: number; mbs: number; p50: number; p99: number }

/**
 * Whether a run beats the cell's kept one: an undisturbed run beats a
 * disturbed one; among undisturbed runs the faster wins (interference only
 * ever slows a run down); among disturbed ones the less disturbed.
 */
function better(iops: number, otherCpus: number, cell: Cell): boolean {
  if (!cell.r) return true;
  const quiet = otherCpus <= CONTENDED, keptQuiet = cell.otherCpus! <= CONTENDED;
  if (quiet !== keptQuiet) return quiet;
  return quiet ? iops > cell.r.iops : otherCpus < cell.otherCpus!;
}

interface Cell {
  peer: string; test: string; conns: number;
  /** How many times the cell ran (once per round, more when the machine was busy). */
  attempts: number;
  /** IOPS kept in each round (index = round - 1), for the per-round ratios. */
  rounds: number[];
  r?: FioResult;
  /** Server CPU per I/O, µs. */
  cpuUs?: number;
  /** Average CPUs used by the server, by fio, and by everything else on the machine. */
  serverCpus?: number; fioCpus?: number; otherCpus?: number;
  error?: string;
}

async function runFio(args: string[], timeoutMs: number, logFile: string): Promise<FioResult> {
  fs.writeFileSync(logFile, '');
  const child = new Child('fio', 'fio', ['--output-format=json', ...args], logFile);
  let timer: NodeJS.Timeout | undefined;
  const timedOut = await Promise.race([
    child.exited.then(() => false),
    new Promise<boolean>((r) => { timer = setTimeout(() => r(true), timeoutMs); }),
  ]);
  clearTimeout(timer);
  if (timedOut) { await child.stop('SIGKILL'); throw new Error(`fio did not finish within ${timeoutMs / 1000} s`); }
  const out = fs.readFileSync(logFile, 'utf8');
  // libnbd's engine prints "fio: connected to NBD server" before the JSON.
  const at = out.search(/^\{/m);
  let json: any;
  try { json = JSON.parse(out.slice(at)); } catch {
    throw new Error(`fio ${child.exitInfo}, no JSON result:\n${out.split('\n').slice(-12).map((l) => `    ${l}`).join('\n')}`);
  }
  if (child.proc.exitCode !== 0) throw new Error(`fio ${child.exitInfo}:\n${out.slice(0, at).trim().split('\n').slice(-8).map((l) => `    ${l}`).join('\n')}`);
  const job = json.jobs?.[0];
  if (!job) throw new Error('fio: no job in the JSON output');
  if (job.error) throw new Error(`fio job error ${job.error}: ${out.slice(0, at).trim().split('\n').slice(-4).join(' / ')}`);
  // --unified_rw_reporting=mixed: reads and writes in one "mixed" section.
  const m = job.mixed ?? job.read;
  const pct = m.clat_ns?.percentile ?? {};
  return {
    ios: m.total_ios, iops: m.iops, mbs: m.bw_bytes / 1e6,
    p50: Number(pct['50.000000']) / 1000, p99: Number(pct['99.000000']) / 1000,
  };
}

function fioArgs(t: Test, u: string, conns: number, seconds: number | null): string[] {
  const a = [`--name=${t.key}`, '--ioengine=nbd', `--uri=${u}`, `--rw=${t.rw}`, `--bs=${t.bs}`, `--iodepth=${t.qd}`,
    `--numjobs=${conns}`, '--group_reporting', '--unified_rw_reporting=mixed', '--norandommap', '--randrepeat=1'];
  if (t.mix !== undefined) a.push(`--rwmixread=${t.mix}`);
  if (seconds !== null) a.push('--time_based', `--runtime=${seconds}`);
  return a;
}

// ------------------------------------------------------------ formatting

const fmtInt = (x: number | undefined) => (x === undefined || !Number.isFinite(x) ? '–' : Math.round(x).toLocaleString('en-US'));
const fmtF = (x: number | undefined, d = 1) => (x === undefined || !Number.isFinite(x) ? '–' : x.toFixed(d));
const fmtX = (x: number | undefined) => (x === undefined || !Number.isFinite(x) ? '–' : `${x.toFixed(2)}×`);

// ------------------------------------------------------------ main

async function main(): Promise<void> {
  const parent = process.env.STRATA_BENCH_TMP ?? os.tmpdir();
  const dir = fs.mkdtempSync(path.join(parent, 'strata-nbd-'));
  // Unix socket paths are limited to 107 bytes.
  if (path.join(dir, 'strata', 'nbd.sock').length > 100) throw new Error(`temporary directory ${dir} is too long for unix socket paths; set STRATA_BENCH_TMP`);
  let cleaned = false;
  const cleanupSync = () => {
    Child.killAllSync();
    if (!KEEP && !cleaned) { cleaned = true; fs.rmSync(dir, { recursive: true, force: true }); }
  };
  process.on('exit', cleanupSync);
  const onSignal = (sig: NodeJS.Signals) => {
    if (interrupted) { cleanupSync(); process.exit(130); }
    interrupted = true;
    log(`${sig}: stopping the servers and removing ${dir}${KEEP ? ' (kept: STRATA_BENCH_KEEP=1)' : ''}`);
    void Child.stopAll().finally(() => { cleanupSync(); process.exit(sig === 'SIGINT' ? 130 : 143); });
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  const need = ['fio', 'nbdkit', 'qemu-nbd', 'qemu-img'];
  for (const t of need) {
    const r = spawnSync(t, ['--version'], { encoding: 'utf8' });
    if (r.error) log(`warning: ${t} not found (${r.error.message}); peers that need it will be skipped. Install: apt-get install -y fio nbdkit libnbd-bin qemu-utils`);
  }
  if (spawnSync('fio', ['--enghelp=nbd'], { encoding: 'utf8' }).status !== 0) {
    throw new Error('this fio has no libnbd `nbd` ioengine (Debian\'s fio has it; install fio from apt)');
  }
  const version = (cmd: string, args: string[]) => {
    const r = spawnSync(cmd, args, { encoding: 'utf8' });
    return r.status === 0 ? String(r.stdout).split('\n')[0].trim() : 'absent';
  };
  const info = {
    date: new Date().toISOString().slice(0, 10), cpus: os.cpus().length, kernel: os.release(), node: process.version,
    fio: version('fio', ['--version']), nbdkit: version('nbdkit', ['--version']), qemu: version('qemu-nbd', ['--version']),
    seconds: SECONDS, load0: os.loadavg()[0], commit: gitState(),
  };
  log(`temporary directory ${dir}; ${SECONDS} s per cell; ${info.cpus} CPUs; load ${info.load0.toFixed(2)}`);

  const img = buildImage(dir);
  const base = img.file;
  log(`base image: ${img.what}`);
  // Warm the page cache for the base (every peer reads it or a copy of it).
  spawnSync('cat', [base], { stdio: ['ignore', 'ignore', 'ignore'], maxBuffer: 0 });

  const want = envList('STRATA_BENCH_PEERS');
  const prev = process.env.STRATA_BENCH_PREV;
  if (prev && !fs.existsSync(path.join(prev, 'src', 'server.js'))) throw new Error(`STRATA_BENCH_PREV=${prev}: no src/server.js there`);
  const all: Peer[] = [
    new StrataPeer(dir, base),
    ...(prev ? [new StrataPeer(dir, base, path.resolve(prev), 'strata-prev', `strata @ ${path.basename(prev)}`)] : []),
    new NbdkitFilePeer(dir, base),
    new NbdkitCowPeer(dir, base, 4096),
    new NbdkitCowPeer(dir, base, 65536),
    new QemuPeer(dir, base, 'threads'),
    new QemuPeer(dir, base, 'io_uring'),
  ];
  if (want) for (const w of want) if (!all.some((p) => p.key === w)) throw new Error(`STRATA_BENCH_PEERS: unknown peer ${w} (known: ${all.map((p) => p.key).join(', ')})`);
  const peers = all.filter((p) => !want || want.includes(p.key));
  const wantTests = envList('STRATA_BENCH_TESTS');
  const tests = ALL_TESTS.filter((t) => (wantTests ?? DEFAULT_TESTS).includes(t.key));
  if (tests.some((t) => t.cold)) {
    try { dropCleanPageCache(); } catch (e) { throw new Error(`coldread drops the page cache and needs root: ${(e as Error).message}`); }
  }
  if (tests.length === 0) throw new Error(`STRATA_BENCH_TESTS matches none of ${ALL_TESTS.map((t) => t.key).join(',')}`);

  // Start and warm every peer: a sequential read of the whole export (the
  // template cache / page cache), then a short 4k mix (JIT, thread pools).
  const fioLog = path.join(dir, 'fio.out');
  for (const p of peers) {
    if (interrupted) break;
    const t = performance.now();
    try {
      await p.start();
      const u = await p.fresh('warm');
      await runFio(fioArgs({ ...ALL_TESTS[3], key: 'warm-seq', bs: '1M' }, u, 1, null), 600_000, fioLog);
      await runFio(fioArgs({ ...ALL_TESTS[2], key: 'warm-mix' }, u, 1, Math.min(2, SECONDS)), 120_000, fioLog);
      log(`${p.label}: started and warmed in ${((performance.now() - t) / 1000).toFixed(1)} s`);
    } catch (e) {
      p.failed = (e as Error).message;
      log(`SKIPPING ${p.label}: ${p.failed}`);
      await p.stop().catch(() => {});
    }
  }
  const live = () => peers.filter((p) => !p.failed);
  if (!live().some((p) => p.key === 'strata')) log('strata did not start: the table has no strata rows and no ratios');

  const cells: Cell[] = [];
  let order = 0;
  // Re-runs are capped for the whole run (half the number of cells) so a
  // machine that never gets quiet does not stretch the run without end.
  let retriesLeft = Math.ceil((tests.length * CONNS.length * live().length) / 2);
  for (const t of tests) {
    for (const conns of CONNS) {
      for (let round = 1; round <= ROUNDS; round++) {
        // Rotate the peer order from cell to cell and round to round so none always goes first.
        const ps = live();
        const rot = ps.map((_, i) => ps[(i + order) % ps.length]);
        order++;
        for (const p of rot) {
          if (interrupted) await new Promise<never>(() => {}); // the signal handler exits
          if (p.failed) continue;
          let cell = cells.find((x) => x.peer === p.key && x.test === t.key && x.conns === conns);
          if (!cell) { cell = { peer: p.key, test: t.key, conns, attempts: 0, rounds: [] }; cells.push(cell); }
          let roundBest: { iops: number; other: number } | undefined;
          // A cell that ran while something else on the machine used CPU is run
          // again (after waiting for a quiet moment); the least disturbed run is kept.
          for (let attempt = 0; attempt <= RETRIES; attempt++) {
            if (attempt > 0) {
              if (retriesLeft <= 0) { log(`  ${p.label}: the machine was busy during the cell, but the re-run budget is spent`); break; }
              retriesLeft--;
              log(`  ${p.label}: other processes used ${fmtF(cell.otherCpus, 2)} CPU during the cell; waiting for a quiet machine and running it again`);
              await waitQuiet(20);
            }
            cell.attempts++;
            try {
              syncDisks(t.cold);
              const u = await p.fresh(`${t.key}-${conns}`);
              if (t.cold) dropCleanPageCache();
              const pid = p.pid();
              const s0 = procCpu(pid), c0 = childrenCpu(), m0 = machineBusy(), w0 = performance.now();
              const r = await runFio(fioArgs(t, u, conns, SECONDS), (SECONDS + 120) * 1000, fioLog);
              const s1 = procCpu(pid), c1 = childrenCpu(), m1 = machineBusy(), wall = (performance.now() - w0) / 1000;
              const serverCpus = (s1 - s0) / wall, fioCpus = (c1 - c0) / wall;
              const otherCpus = Math.max(0, (m1 - m0) / wall - serverCpus - fioCpus);
              log(`${t.label} nj=${conns} ${p.label.padEnd(26)} ${fmtInt(r.iops).padStart(8)} IOPS ${fmtF(r.mbs).padStart(7)} MB/s p50 ${fmtInt(r.p50)} p99 ${fmtInt(r.p99)} µs, server ${fmtF(((s1 - s0) / r.ios) * 1e6)} µs/IO (${fmtF(serverCpus, 2)} CPU), fio ${fmtF(fioCpus, 2)} CPU, other ${fmtF(otherCpus, 2)} CPU`);
              const quiet = otherCpus <= CONTENDED;
              if (!roundBest || (quiet && (roundBest.other > CONTENDED || r.iops > roundBest.iops))) {
                roundBest = { iops: r.iops, other: otherCpus };
                cell.rounds[round - 1] = r.iops;
              }
              if (better(r.iops, otherCpus, cell)) {
                Object.assign(cell, { r, cpuUs: ((s1 - s0) / r.ios) * 1e6, serverCpus, fioCpus, otherCpus, error: undefined });
              }
              if (otherCpus <= CONTENDED) break;
            } catch (e) {
              const msg = (e as Error).message;
              log(`${t.label} nj=${conns} ${p.label}: FAILED: ${msg}`);
              if (!cell.r) cell.error = msg;
              // A daemon that died takes the rest of its cells with it.
              if (p.key.startsWith('strata') || p.key === 'nbdkit-file') {
                const alive = await p.fresh('probe').then(() => true, () => false);
                if (!alive) { p.failed = msg; log(`SKIPPING ${p.label} from now on`); }
              }
              break;
            }
          }
        }
      }
    }
  }
  info.load0 = Number(info.load0.toFixed(2));
  const load1 = os.loadavg()[0];

  await Promise.all(peers.map((p) => p.stop().catch(() => {})));

  // ------------------------------------------------------------ report
  const label = (k: string) => peers.find((p) => p.key === k)?.label ?? k;
  const test = (k: string) => ALL_TESTS.find((t) => t.key === k)!;
  const get = (peer: string, t: string, c: number) => cells.find((x) => x.peer === peer && x.test === t && x.conns === c && x.r);
  const out: string[] = [];
  out.push(`### NBD results (${info.date}, ${info.cpus} CPUs, ${SECONDS} s per cell, best of ${ROUNDS} interleaved round${ROUNDS > 1 ? 's' : ''})`, '');
  out.push(`Base: ${img.what}. fio ${info.fio.replace(/^fio-/, '')} libnbd engine over unix sockets, 4k at iodepth 32 and 128k at iodepth 8 per connection; conns = fio numjobs (one NBD connection each). ${info.nbdkit}, ${info.qemu.replace(/ \(.*\)/, '')}, Node ${info.node}, kernel ${info.kernel}, strata ${info.commit}. Load average ${info.load0} at start, ${load1.toFixed(2)} at end.`, '');
  out.push('| peer | test | conns | IOPS | MB/s | p50 µs | p99 µs | server CPU µs/IO | notes |');
  out.push('|---|---|---:|---:|---:|---:|---:|---:|---|');
  for (const t of tests) {
    for (const conns of CONNS) {
      for (const p of peers) {
        const c = cells.find((x) => x.peer === p.key && x.test === t.key && x.conns === conns);
        if (!c) continue;
        if (!c.r) { out.push(`| ${p.label} | ${t.label} | ${conns} | – | – | – | – | – | failed: ${String(c.error).split('\n')[0].slice(0, 100)} |`); continue; }
        const notes: string[] = [];
        if ((c.otherCpus ?? 0) > CONTENDED) notes.push(`⚠ other processes used ${fmtF(c.otherCpus, 1)} CPU`);
        if (c.attempts > ROUNDS) notes.push(`best of ${c.attempts} runs`);
        const name = p.key === 'strata' ? `**${p.label}**` : p.label;
        out.push(`| ${name} | ${t.label} | ${conns} | ${fmtInt(c.r.iops)} | ${fmtF(c.r.mbs, 0)} | ${fmtInt(c.r.p50)} | ${fmtInt(c.r.p99)} | ${fmtF(c.cpuUs)} | ${notes.join('; ')} |`);
      }
    }
  }
  for (const p of peers) if (p.failed && !cells.some((c) => c.peer === p.key)) out.push('', `${p.label} was skipped: ${p.failed.split('\n')[0]}`);

  const others = peers.filter((p) => p.key !== 'strata');
  if (peers.some((p) => p.key === 'strata') && others.length) {
    out.push('', '#### strata ÷ peer, IOPS (> 1: strata faster)', '');
    out.push(`| test | conns | ${others.map((p) => p.label).join(' | ')} |`);
    out.push(`|---|---:|${others.map(() => '---:').join('|')}|`);
    for (const t of tests) for (const conns of CONNS) {
      const s = get('strata', t.key, conns);
      out.push(`| ${t.label} | ${conns} | ${others.map((p) => { const o = get(p.key, t.key, conns); return s && o ? fmtX(s.r!.iops / o.r!.iops) : '–'; }).join(' | ')} |`);
    }
    out.push('', '#### peer ÷ strata, server CPU per I/O (> 1: strata uses less CPU per I/O)', '');
    out.push(`| test | conns | ${others.map((p) => p.label).join(' | ')} |`);
    out.push(`|---|---:|${others.map(() => '---:').join('|')}|`);
    for (const t of tests) for (const conns of CONNS) {
      const s = get('strata', t.key, conns);
      out.push(`| ${t.label} | ${conns} | ${others.map((p) => { const o = get(p.key, t.key, conns); return s && o ? fmtX(o.cpuUs! / s.cpuUs!) : '–'; }).join(' | ')} |`);
    }

    // Targets.
    out.push('', '#### Targets', '');
    // Beside the verdict (best ÷ best) the median of the per-round ratios,
    // strata ÷ the best peer of that round (bench/rounds.ts).
    out.push('| target | test | conns | strata | peer | ratio | met | median of per-round ratios |');
    out.push('|---|---|---:|---:|---:|---:|---|---|');
    const perRound = (s: Cell, os_: Cell[]) =>
      medianOfRounds(s.rounds, s.rounds.map((_, i) => Math.max(...os_.map((o) => o.rounds[i] ?? NaN))));
    let met = 0, missed = 0, unknown = 0, shaky = 0;
    const check = (name: string, t: Test, conns: number, peerKeys: string[], need: number) => {
      const s = get('strata', t.key, conns);
      const os_ = peerKeys.map((k) => get(k, t.key, conns)).filter((x): x is Cell => !!x);
      if (!s || os_.length === 0) { unknown++; out.push(`| ${name} | ${t.label} | ${conns} | ${s ? fmtInt(s.r!.iops) : '–'} | – | – | not measured | – |`); return; }
      const best = os_.reduce((a, b) => (b.r!.iops > a.r!.iops ? b : a));
      const ratio = s.r!.iops / best.r!.iops;
      const ok = ratio >= need;
      if (ok) met++; else missed++;
      const disturbed = [s, best].some((c) => (c.otherCpus ?? 0) > CONTENDED);
      if (disturbed) shaky++;
      out.push(`| ${name} | ${t.label} | ${conns} | ${fmtInt(s.r!.iops)} | ${fmtInt(best.r!.iops)}${os_.length > 1 ? ` (${label(best.peer)})` : ''} | ${fmtX(ratio)} | ${ok ? 'yes' : '**no**'}${disturbed ? ' ⚠ (machine busy)' : ''} | ${perRound(s, os_)} |`);
    };
    for (const t of tests.filter((x) => x.small)) for (const conns of CONNS) check('≥ 1.2× nbdkit cow 4k', t, conns, ['nbdkit-cow4k'], 1.2);
    for (const t of tests.filter((x) => x.small)) for (const conns of CONNS) check('≥ 1.2× qemu-nbd (best aio)', t, conns, ['qemu-threads', 'qemu-uring'], 1.2);
    for (const t of tests.filter((x) => x.cachedRead)) for (const conns of CONNS) check('≥ 0.9× nbdkit file (cached reads)', t, conns, ['nbdkit-file'], 0.9);
    if (peers.some((p) => p.key === 'strata-prev')) for (const t of tests) for (const conns of CONNS) check('≥ 0.9× the previous strata', t, conns, ['strata-prev'], 0.9);
    out.push('', `Targets: ${met} met, ${missed} not met${unknown ? `, ${unknown} not measured` : ''}${shaky ? ` (${shaky} measured while other processes used > ${CONTENDED} CPU: ⚠)` : ''}.`);
  }
  process.stdout.write(out.join('\n') + '\n');

  if (process.env.STRATA_BENCH_JSON) {
    fs.writeFileSync(process.env.STRATA_BENCH_JSON, JSON.stringify({ info, image: img.what, peers: peers.map((p) => ({ key: p.key, label: p.label, failed: p.failed })), cells }, null, 2));
    log(`raw results: ${process.env.STRATA_BENCH_JSON}`);
  }
  if (KEEP) log(`kept ${dir}`);
  log(`done in ${((performance.now() - T0) / 1000 / 60).toFixed(1)} min`);
}

main().then(() => process.exit(0), (e) => {
  log(`error: ${(e as Error).stack ?? e}`);
  process.exit(1);
});
