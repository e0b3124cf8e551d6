// Shared bits of the in-VM ublk tests (test/vm/ublk-*.ts): checks, shell
// commands run asynchronously (this process serves the device: a synchronous
// child would deadlock on the slow path), and which transports to cover.
import * as fs from 'fs';
import * as readline from 'readline';
import { execFile, spawn, type ChildProcess } from 'child_process';
import { features, kernelDevices, type UblkFeatures } from '../../src/ublk';

export let passed = 0, failed = 0, skipped = 0;
export function check(ok: boolean, what: string): boolean {
  if (ok) { passed++; console.log(`ok   ${what}`); } else { failed++; console.log(`FAIL ${what}`); }
  return ok;
}
export function skip(what: string): void { skipped++; console.log(`SKIP: ${what}`); }

export const sh = (cmd: string, timeoutMs = 300_000) => new Promise<string>((res, rej) =>
  execFile('sh', ['-c', cmd], { timeout: timeoutMs, maxBuffer: 1 << 24 }, (e, out, err) =>
    (e ? rej(new Error(`${cmd}: ${(err || e.message).trim()}`)) : res(out))));

export const kernel = () => fs.readFileSync('/proc/sys/kernel/osrelease', 'utf8').trim();

/** ublk features, or null after printing why the test cannot run. */
export function ublkOrSkip(): UblkFeatures | null {
  try {
    return features();
  } catch (e) {
    skip(`ublk unavailable here: ${(e as Error).message}`);
    return null;
  }
}

/** Every transport this kernel offers (7.3: both; 6.12: user-copy). */
export function transports(f: UblkFeatures): Array<'zero-copy' | 'user-copy'> {
  const out: Array<'zero-copy' | 'user-copy'> = [];
  if (f.zeroCopy) out.push('zero-copy');
  if (f.userCopy) out.push('user-copy');
  return out;
}

export function scratchFile(path: string, bytes: number): void {
  fs.writeFileSync(path, Buffer.alloc(0));
  fs.truncateSync(path, bytes);
}

export const fdCount = () => fs.readdirSync('/proc/self/fd').length;
const comms = () => fs.readdirSync('/proc/self/task').map((t) => {
  try { return fs.readFileSync(`/proc/self/task/${t}/comm`, 'utf8').trim(); } catch { return ''; }
});
/**
 * Threads of this process, without io_uring's kernel workers (iou-wrk-*):
 * those belong to rings used from libuv threads (the control ring) and
 * linger until their idle timeout.
 */
export const threadCount = () => comms().filter((c) => c !== '' && !c.startsWith('iou-')).length;
export const iouWorkers = () => comms().filter((c) => c.startsWith('iou-')).length;
/** Kernel ublk devices now, as their char device names (ublkcN). */
export const ublkDevices = () => kernelDevices().map((id) => `ublkc${id}`);

export function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
}

export async function waitFor(cond: () => boolean, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (cond()) return true;
    await new Promise((r) => setTimeout(r, 20));
  }
  return cond();
}

export function finish(name: string, t0: number): never {
  console.log(`${name} on ${kernel()}: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  console.log(`${passed} passed, ${failed} failed, ${skipped} skipped`);
  process.exit(failed ? 1 : 0);
}

/**
 * Runs `script --serve ...args` as a child that creates a device, prints
 * `ID <n>` and serves until killed (see serveUntilKilled). Resolves with the
 * child and the device id (NaN if the child said something else: `line`).
 */
export async function startServer(script: string, args: string[]): Promise<{ child: ChildProcess; id: number; line: string }> {
  const child = spawn(process.execPath, ['-r', 'tsx/cjs', script, '--serve', ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
  const line = await new Promise<string>((res) => {
    const rl = readline.createInterface({ input: child.stdout! });
    rl.once('line', res);
    child.once('close', () => res('closed'));
  });
  return { child, id: Number(/^ID (\d+)$/.exec(line)?.[1] ?? NaN), line };
}

/** The child side of startServer: create the device, report its id, serve until killed. */
export function serveUntilKilled(create: () => Promise<{ id: number }>): void {
  create().then((d) => {
    console.log(`ID ${d.id}`);
    setInterval(() => undefined, 1 << 30);
  }, (e) => { console.log(`ERR ${(e as Error).message}`); process.exit(1); });
}

/**
 * dd of `src` onto a device in 4 KiB direct writes (thousands of requests,
 * so a server killed meanwhile dies mid-stream); `exited()` tells whether it
 * has finished yet.
 */
export function startDd(src: string, dst: string): { proc: ChildProcess; done: Promise<number>; exited(): boolean } {
  const proc = spawn('dd', [`if=${src}`, `of=${dst}`, 'bs=4k', 'oflag=direct', 'status=none'], { stdio: 'ignore' });
  let ended = false;
  const done = new Promise<number>((r) => proc.on('close', (c) => { ended = true; r(c ?? -1); }));
  return { proc, done, exited: () => ended };
}

/**
 * fio writing `mib` MiB of 4 KiB random blocks to `dev` at depth 16 and
 * then reading every one back against its crc32c header (verify_fatal): a
 * server killed meanwhile dies mid-run. `done` is fio's exit code; `out()`
 * its output; `clean(code)` whether it ended without any verify error.
 */
export function startFioVerify(dev: string, mib: number): { proc: ChildProcess; done: Promise<number>; exited(): boolean; out(): string; clean(code: number): boolean } {
  const proc = spawn('fio', ['--name=verify', `--filename=${dev}`, '--direct=1', '--ioengine=libaio', '--iodepth=16', '--rw=randwrite',
    '--bs=4k', `--size=${mib}M`, '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--randrepeat=0'],
  { stdio: ['ignore', 'pipe', 'pipe'] });
  let text = '', ended = false;
  proc.stdout!.on('data', (d) => { text += d; });
  proc.stderr!.on('data', (d) => { text += d; });
  const done = new Promise<number>((r) => proc.on('close', (c) => { ended = true; r(c ?? -1); }));
  return {
    proc, done, exited: () => ended, out: () => text,
    clean: (code) => code === 0 && !/verify: bad|verify failed|crc32c: wanted|err=\s*[1-9]/i.test(text),
  };
}

/**
 * Start of an in-VM ublk test: its features (or, without ublk, the skip is
 * printed and the process ends) and a fresh scratch directory.
 */
export function begin(name: string, dir: string): { f: UblkFeatures; t0: number } {
  const t0 = Date.now();
  const f = ublkOrSkip();
  if (!f) finish(name, t0);
  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(dir, { recursive: true });
  return { f: f!, t0 };
}
