// Helpers of the sandbox flow (test/sandbox/run.ts): checks in the style of
// test/vm/*.ts, the strata daemon as a child process with its HTTP API, a
// QEMU guest booted from an NBD export (serial console in a file, the guest
// agent on a unix socket), and the guest's file contents.
import * as fs from 'fs';
import * as net from 'net';
import * as path from 'path';
import * as crypto from 'crypto';
import { execFile, spawn, type ChildProcess } from 'child_process';
import { call, finished, metrics, type Reply } from '../helpers/daemon';

// ------------------------------------------------------------------ checks
export let passed = 0, failed = 0, skipped = 0;
export function check(ok: boolean, what: string): boolean {
  if (ok) { passed++; console.log(`ok   ${what}`); } else { failed++; console.log(`FAIL ${what}`); }
  return ok;
}
export function skip(what: string): void { skipped++; console.log(`SKIP: ${what}`); }
export const note = (what: string) => console.log(`     ${what}`);
export function summary(): string { return `${passed} passed, ${failed} failed, ${skipped} skipped`; }

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** A command through sh; rejects with its stderr (or the error) on a non-zero exit. */
export const sh = (cmd: string, timeoutMs = 300_000) => new Promise<string>((res, rej) =>
  execFile('sh', ['-c', cmd], { timeout: timeoutMs, maxBuffer: 1 << 26 }, (e, out, err) =>
    (e ? rej(new Error(`${cmd}: ${(err || e.message).trim()}`)) : res(out))));

/** A command's exit status and output, whatever the status. */
export const run = (file: string, args: string[], timeoutMs = 300_000) =>
  new Promise<{ code: number; out: string }>((res) =>
    execFile(file, args, { timeout: timeoutMs, maxBuffer: 1 << 26 }, (e, out, err) =>
      res({ code: e ? (typeof (e as any).code === 'number' ? (e as any).code : -1) : 0, out: `${out}${err}` })));

export function which(cmd: string): string | null {
  for (const d of (process.env.PATH ?? '/usr/bin:/bin').split(':').concat(['/usr/sbin', '/sbin'])) {
    const p = path.join(d, cmd);
    try { fs.accessSync(p, fs.constants.X_OK); return p; } catch { /* next */ }
  }
  return null;
}

/** Cleanups run in reverse order on the way out, failure or not. */
const cleanups: Array<{ what: string; fn: () => unknown }> = [];
export function onCleanup(what: string, fn: () => unknown): void { cleanups.push({ what, fn }); }
export async function cleanupAll(): Promise<void> {
  while (cleanups.length) {
    const c = cleanups.pop()!;
    try { await Promise.race([Promise.resolve(c.fn()), sleep(30_000)]); } catch (e) { console.log(`     cleanup ${c.what}: ${(e as Error).message}`); }
  }
}

// ------------------------------------------------------------------ daemon
const SERVER = path.join(__dirname, '..', '..', 'src', 'server.js');

export class Daemon {
  readonly child: ChildProcess;
  private log = '';
  readonly exited: Promise<number | null>;
  readonly api: string;

  constructor(readonly name: string, readonly data: string, readonly store: string, readonly logFile: string, extra: string[] = []) {
    fs.mkdirSync(data, { recursive: true });
    this.api = path.join(data, 'api.sock');
    this.child = spawn(process.execPath, [SERVER, '--data', data, '--store', store, '--frontend', 'nbd', ...extra],
      { stdio: ['ignore', 'pipe', 'pipe'] });
    const out = fs.createWriteStream(logFile);
    const take = (d: Buffer) => { this.log += d; out.write(d); if (this.log.length > 4 << 20) this.log = this.log.slice(-(2 << 20)); };
    this.child.stdout!.on('data', take);
    this.child.stderr!.on('data', take);
    this.exited = new Promise((r) => this.child.on('exit', (c, s) => { out.end(); r(c ?? (s ? 128 : null)); }));
    onCleanup(`daemon ${name}`, () => this.stop());
  }

  out(): string { return this.log; }

  async started(ms = 120_000): Promise<boolean> {
    const end = Date.now() + ms;
    while (Date.now() < end && this.child.exitCode === null && this.child.signalCode === null) {
      if (/"msg":"strata daemon started"/.test(this.log)) return true;
      await sleep(100);
    }
    return /"msg":"strata daemon started"/.test(this.log);
  }

  request(method: string, p: string, body?: unknown): Promise<Reply> { return call({ socketPath: this.api }, method, p, body); }

  /** Polls an operation until it is no longer running. */
  operation(id: string, ms = 600_000): Promise<any> { return finished({ socketPath: this.api }, id, ms); }

  /** POST that answers with an operation (202), polled to its end; throws with the API's words otherwise. */
  async longOp(p: string, body?: unknown): Promise<any> {
    const r = await this.request('POST', p, body);
    if (r.status !== 202 || !r.json?.id) throw new Error(`POST ${p}: HTTP ${r.status} ${r.text.slice(0, 500)}`);
    const op = await this.operation(r.json.id);
    if (op.state !== 'succeeded') throw new Error(`POST ${p}: operation ${op.state}: ${JSON.stringify(op.error ?? op).slice(0, 800)}`);
    return op.result;
  }

  async createDevice(layer: string, id: string): Promise<{ id: string; uri: string; json: any }> {
    const r = await this.request('POST', '/v1/devices', { layer, id, frontend: 'nbd' });
    if (r.status !== 201) throw new Error(`POST /v1/devices ${id} on ${layer}: HTTP ${r.status} ${r.text.slice(0, 500)}`);
    const uri = r.json?.nbd?.uri;
    if (typeof uri !== 'string') throw new Error(`POST /v1/devices: no nbd.uri in ${r.text.slice(0, 500)}`);
    return { id, uri, json: r.json };
  }

  async deleteDevice(id: string): Promise<number> {
    return (await this.request('DELETE', `/v1/devices/${encodeURIComponent(id)}`)).status;
  }

  /** Prometheus counters, by name (labels dropped, values summed). */
  metrics(): Promise<Record<string, number>> { return metrics({ socketPath: this.api }); }


  /** SIGTERM, then SIGKILL after `ms`; resolves with the exit code. */
  async stop(ms = 60_000): Promise<number | null> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return this.child.exitCode;
    this.child.kill('SIGTERM');
    const code = await Promise.race([this.exited, sleep(ms).then(() => 'timeout' as const)]);
    if (code === 'timeout') { this.child.kill('SIGKILL'); await this.exited; return -1; }
    return code;
  }
}

// ------------------------------------------------------------------ guest
export interface GuestSpec { kernel: string; initrd: string; mem?: number; smp?: number }

/** The guest agent on ttyS1: one command line in, its output and "\nSTRATA-DONE <status>" out. */
class Agent {
  private buf = '';
  private waiter: (() => void) | null = null;
  private closed = false;
  constructor(private readonly sock: net.Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => { this.buf += d; this.waiter?.(); });
    sock.on('close', () => { this.closed = true; this.waiter?.(); });
    sock.on('error', () => { this.closed = true; this.waiter?.(); });
  }

  async run(cmd: string, ms = 180_000): Promise<{ status: number; out: string }> {
    if (cmd.includes('\n')) throw new Error('agent commands are one line');
    this.buf = '';
    this.sock.write(`${cmd}\n`);
    const end = Date.now() + ms;
    for (;;) {
      const m = /\nSTRATA-DONE (\d+)\n/.exec(this.buf);
      if (m) {
        const out = this.buf.slice(0, m.index);
        this.buf = this.buf.slice(m.index + m[0].length);
        return { status: Number(m[1]), out };
      }
      if (this.closed) throw new Error(`agent: connection closed during '${cmd}' (got ${JSON.stringify(this.buf.slice(-300))})`);
      const left = end - Date.now();
      if (left <= 0) throw new Error(`agent: no answer to '${cmd}' in ${ms / 1000} s (got ${JSON.stringify(this.buf.slice(-300))})`);
      await new Promise<void>((r) => { const t = setTimeout(r, Math.min(left, 1000)); this.waiter = () => { clearTimeout(t); r(); }; });
      this.waiter = null;
    }
  }

  /** Sends a line without waiting for an answer (poweroff). */
  send(cmd: string): void { this.sock.write(`${cmd}\n`); }
  close(): void { this.sock.destroy(); }
}

export class Guest {
  readonly child: ChildProcess;
  readonly console: string;
  readonly agentSock: string;
  readonly t0: number;
  readonly exited: Promise<number | null>;
  private agentConn: Agent | null = null;
  private stderr = '';

  /**
   * Boots a guest on the NBD export `uri`. With QEMU's own NBD client (the
   * default) it is the guest's virtio-blk /dev/vda; with `kernelNbd` the
   * guest's initramfs connects its kernel's nbd driver to it (/dev/nbd0) over
   * QEMU user networking, so `uri` must be an nbd:// TCP one on the host.
   * `trace`: a file QEMU logs the guest's block requests to (blk_co_preadv /
   * blk_co_pwritev trace events; QEMU's client only).
   */
  constructor(readonly name: string, dir: string, spec: GuestSpec, uri: string, opts: { trace?: string; kernelNbd?: boolean } = {}) {
    fs.mkdirSync(dir, { recursive: true });
    this.console = path.join(dir, `${name}.console.log`);
    this.agentSock = path.join(dir, `${name}.agent.sock`);
    const q = (s: string) => s.replace(/,/g, ',,');
    let root = 'root=/dev/vda', disk = ['-drive', `file=${q(uri)},format=raw,if=virtio`];
    if (opts.kernelNbd) {
      // the guest reaches the host's loopback as 10.0.2.2 (slirp); no other network
      const m = /^nbd:\/\/(?:127\.0\.0\.1|localhost):(\d+)\/(.+)$/.exec(uri);
      if (!m) throw new Error(`kernel nbd root: ${uri} is not an nbd:// URI on the host's loopback`);
      root = `root=/dev/nbd0 strata.nbd=10.0.2.2:${m[1]}/${m[2]}`;
      disk = ['-netdev', 'user,id=n0,restrict=off,ipv6=off', '-device', 'virtio-net-pci,netdev=n0,romfile='];
    }
    const args = [
      '-nodefaults', '-no-user-config', '-display', 'none', '-monitor', 'none', '-no-reboot',
      '-machine', 'pc', '-accel', 'tcg', '-cpu', 'max', '-m', String(spec.mem ?? 768), '-smp', String(spec.smp ?? 1),
      '-kernel', spec.kernel, '-initrd', spec.initrd,
      '-append', `${root} rw console=ttyS0 quiet panic=-1 mitigations=off tsc=reliable`,
      '-chardev', `file,id=con,path=${q(this.console)}`, '-serial', 'chardev:con',
      '-chardev', `socket,id=agent,path=${q(this.agentSock)},server=on,wait=off`, '-serial', 'chardev:agent',
      ...disk,
      ...(opts.trace ? ['-trace', 'enable=blk_co_preadv', '-trace', 'enable=blk_co_pwritev', '-D', opts.trace, '-msg', 'timestamp=on'] : []),
    ];
    this.t0 = Date.now();
    this.child = spawn(process.env.QEMU ?? 'qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    this.child.stderr!.on('data', (d) => { this.stderr += d; });
    this.exited = new Promise((r) => this.child.on('exit', (c, s) => r(c ?? (s ? 128 : null))));
    onCleanup(`guest ${name}`, () => this.kill());
  }

  consoleText(): string { try { return fs.readFileSync(this.console, 'utf8'); } catch { return ''; } }
  alive(): boolean { return this.child.exitCode === null && this.child.signalCode === null; }
  qemuStderr(): string { return this.stderr; }

  /** Waits for "STRATA-READY <uptime>" on the console: host ms since QEMU started, and the guest's uptime. */
  async ready(ms = 300_000): Promise<{ ms: number; uptime: number }> {
    const end = this.t0 + ms;
    for (;;) {
      const m = /STRATA-READY ([0-9.]+)/.exec(this.consoleText());
      if (m) return { ms: Date.now() - this.t0, uptime: Number(m[1]) };
      if (!this.alive()) throw new Error(`${this.name}: QEMU exited (${this.child.exitCode ?? this.child.signalCode}) before the ready marker; ${this.stderr.trim()}`);
      if (Date.now() > end) throw new Error(`${this.name}: no STRATA-READY within ${ms / 1000} s`);
      await sleep(50);
    }
  }

  async agent(): Promise<Agent> {
    if (this.agentConn) return this.agentConn;
    const sock = await new Promise<net.Socket>((res, rej) => {
      const s = net.connect(this.agentSock);
      s.once('connect', () => res(s));
      s.once('error', rej);
    });
    this.agentConn = new Agent(sock);
    const hello = await this.agentConn.run('echo STRATA-HELLO', 60_000);
    if (hello.status !== 0 || hello.out.trim() !== 'STRATA-HELLO') throw new Error(`${this.name}: agent said ${JSON.stringify(hello)}`);
    return this.agentConn;
  }

  /** Runs a command through the agent; throws unless it exits 0. */
  async sh(cmd: string, ms = 180_000): Promise<string> {
    const r = await (await this.agent()).run(cmd, ms);
    if (r.status !== 0) throw new Error(`${this.name}: '${cmd}' exited ${r.status}: ${r.out.trim().slice(-500)}`);
    return r.out;
  }

  /** `poweroff` through the agent; true when QEMU exited by itself within `ms`. */
  async poweroff(ms = 120_000): Promise<boolean> {
    if (!this.alive()) return true;
    (await this.agent()).send('poweroff');
    const r = await Promise.race([this.exited.then(() => true), sleep(ms).then(() => false)]);
    this.agentConn?.close();
    if (!r) await this.kill();
    return r;
  }

  async kill(): Promise<void> {
    this.agentConn?.close();
    if (!this.alive()) return;
    this.child.kill('SIGTERM');
    if (await Promise.race([this.exited.then(() => true), sleep(10_000).then(() => false)])) return;
    this.child.kill('SIGKILL');
    await this.exited;
  }
}

// ------------------------------------------------------------------ files
/**
 * A file's content, made from its name: the lines "<name> <n, 12 digits>"
 * for n = 1, 2, ... cut at `bytes` (every 4 KiB block differs). The guest
 * writes the same bytes with fileCommand.
 */
export function fileContent(name: string, bytes: number): Buffer {
  const lineLen = name.length + 14;
  const lines = Math.ceil(bytes / lineLen);
  const parts: string[] = [];
  for (let i = 1; i <= lines; i++) parts.push(`${name} ${String(i).padStart(12, '0')}\n`);
  return Buffer.from(parts.join(''), 'latin1').subarray(0, bytes);
}
export function fileCommand(name: string, bytes: number, dest: string): string {
  if (!/^[A-Za-z0-9_.-]+$/.test(name)) throw new Error(`file name ${name}: letters, digits, _ . - only`);
  const lines = Math.ceil(bytes / (name.length + 14));
  return `seq -f '${name} %012.0f' 1 ${lines} | head -c ${bytes} > ${dest}`;
}
export const sha256 = (b: Buffer) => crypto.createHash('sha256').update(b).digest('hex');
