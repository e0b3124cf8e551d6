// Runs inside the kernel test VM (also fine on the host): async io_uring
// completions must reach JS through the ring's eventfd wake-up, promptly and
// without further submissions. Uring's last-resort watchdog must stay idle:
// it fails the test if it had to deliver anything (regression: a 2 ms
// watchdog used to take those completions in the guests and hid whether the
// wake-up worked).
import * as fs from 'fs';
import { Uring } from '../../src/uring';

const mem = new WebAssembly.Memory({ initial: 64, maximum: 1024, shared: true });
const BUF = 65536;
const u = new Uring(mem, { offset: BUF, length: 1 << 20 }, 64);
const file = '/tmp/uring-wakeup.bin';
const fd = fs.openSync(file, 'w+');
let passed = 0, failed = 0;
function check(ok: boolean, what: string): void {
  if (ok) { passed++; console.log(`ok   ${what}`); } else { failed++; console.log(`FAIL ${what}`); }
}
// A referenced timer: it also keeps the process alive should nothing else.
function within<T>(p: Promise<T>, ms: number): Promise<T | 'timeout'> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<'timeout'>((r) => { timer = setTimeout(() => r('timeout'), ms); });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}
let finished = false;
process.on('exit', (code) => {
  if (!finished && code === 0) { console.log('FAIL the event loop ran dry with I/O still pending'); process.exitCode = 1; }
});
const ms = (t0: bigint) => Number(process.hrtime.bigint() - t0) / 1e6;
function summary(xs: number[]): string {
  const s = [...xs].sort((a, b) => a - b);
  const q = (p: number) => s[Math.min(s.length - 1, Math.floor(p * s.length))].toFixed(3);
  return `n=${s.length} median ${q(0.5)} ms, p90 ${q(0.9)} ms, max ${s[s.length - 1].toFixed(3)} ms`;
}

(async () => {
  const t0 = Date.now();
  // 1. Each kind of op completes on its own (nothing else submits meanwhile).
  for (const [what, p] of [['write', () => u.write(fd, 0, 4096, BUF)], ['fdatasync', () => u.fsync(fd)],
    ['read', () => u.read(fd, 0, 4096, BUF)]] as const) {
    const r = await within(p(), 5000);
    check(r !== 'timeout', `${what} completes on its own (${r})`);
  }

  // 2. Sequential 4 KiB writes and reads (one in flight): completion latency.
  const lat: Record<string, number[]> = { write: [], read: [], fdatasync: [] };
  let timeouts = 0;
  for (let i = 0; i < 50 && timeouts < 3; i++) {
    const ops: Array<[string, () => Promise<number>]> = [
      ['write', () => u.write(fd, i * 4096, 4096, BUF + 4096 * (i % 16))],
      ['read', () => u.read(fd, i * 4096, 4096, BUF + 4096 * (16 + (i % 16)))],
    ];
    if (i % 10 === 9) ops.push(['fdatasync', () => u.fsync(fd)]);
    for (const [what, op] of ops) {
      const t = process.hrtime.bigint();
      const r = await within(op(), 5000);
      if (r === 'timeout') { timeouts++; console.log(`     ${what} #${i} timed out`); continue; }
      lat[what].push(ms(t));
    }
  }
  check(timeouts === 0, `50 sequential 4 KiB write+read pairs and 5 fdatasyncs complete (${timeouts} timed out)`);
  for (const [what, xs] of Object.entries(lat)) if (xs.length) console.log(`     latency ${what.padEnd(9)} ${summary(xs)}`);

  // 3. A concurrent batch: 32 writes, then 32 reads, in flight together.
  const tb = process.hrtime.bigint();
  const w = await within(Promise.all(Array.from({ length: 32 }, (_, i) => u.write(fd, (64 + i) * 4096, 4096, BUF + 4096 * i))), 10000);
  const r = await within(Promise.all(Array.from({ length: 32 }, (_, i) => u.read(fd, (64 + i) * 4096, 4096, BUF + 4096 * (32 + i)))), 10000);
  check(w !== 'timeout' && r !== 'timeout', `32 concurrent writes, then 32 concurrent reads complete (${ms(tb).toFixed(1)} ms)`);

  // fdatasync always completes asynchronously (io-wq), so the wake-up was used.
  console.log(`     stats ${JSON.stringify(u.stats)}`);
  check(u.stats.wakeups > 0, `completions were delivered by the eventfd wake-up (${u.stats.wakeups} batches)`);
  check(u.stats.watchdogReaps === 0, `the watchdog delivered nothing (watchdogReaps ${u.stats.watchdogReaps})`);
  u.close();
  fs.closeSync(fd);
  fs.rmSync(file, { force: true });
  console.log(`uring-wakeup on ${fs.readFileSync('/proc/sys/kernel/osrelease', 'utf8').trim()}: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  console.log(`${passed} passed, ${failed} failed`);
  finished = true;
  process.exit(failed ? 1 : 0);
})();
