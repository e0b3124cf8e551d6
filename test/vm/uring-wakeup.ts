// Runs inside the kernel test VM: async io_uring completions must reach JS
// on the guest kernel without further submissions (regression: the eventfd
// wake-up alone never fired there).
import * as fs from 'fs';
import { Uring } from '../../src/uring';

const mem = new WebAssembly.Memory({ initial: 64, maximum: 1024, shared: true });
const u = new Uring(mem, { offset: 65536, length: 1 << 20 }, 64);
const fd = fs.openSync('/tmp/uring-wakeup.bin', 'w+');
const within = <T>(p: Promise<T>, ms: number) => Promise.race([p, new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), ms))]);
(async () => {
  let failed = 0;
  for (const [what, p] of [['write', () => u.write(fd, 0, 4096, 65536)], ['fdatasync', () => u.fsync(fd)], ['read', () => u.read(fd, 0, 4096, 65536)]] as const) {
    const r = await within(p(), 5000);
    console.log(`${r === 'timeout' ? 'FAIL' : 'ok  '} ${what} completes on its own (${r})`);
    if (r === 'timeout') failed++;
  }
  u.close();
  console.log(`${3 - failed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
})();
