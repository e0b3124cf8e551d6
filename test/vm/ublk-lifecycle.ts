// Runs INSIDE the kernel test VM: lifecycle edges of a ublk device.
// - delete() while fio hammers the device (native fast path, and with every
//   request on the JavaScript slow path): resolves promptly, the load sees
//   errors instead of hanging, the kernel device goes once the opener exits;
// - TRY_STOP_DEV refuses with EBUSY while the device is open (kernel >= 7.0),
//   or is reported as unsupported (ENOTSUP) before;
// - a transport the kernel lacks fails with a typed ENOTSUP error.
import * as fs from 'fs';
import { spawn } from 'child_process';
import { UblkDevice, FileTarget, UblkError } from '../../src/ublk';
import { check, transports, scratchFile, finish, ublkDevices, waitFor, begin } from './ublk-helpers';

const DIR = '/tmp/strata-vm-ublk-life';

function within<T>(p: Promise<T>, ms: number): Promise<T | 'timeout'> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([p, new Promise<'timeout'>((r) => { timer = setTimeout(() => r('timeout'), ms); })]).finally(() => clearTimeout(timer));
}

function run(cmd: string, args: string[]): { done: Promise<number>; kill: () => void } {
  const c = spawn(cmd, args, { stdio: 'ignore' });
  return { done: new Promise((r) => c.on('close', (code) => r(code ?? -1))), kill: () => c.kill('SIGKILL') };
}

async function deleteUnderLoad(target: FileTarget, transport: 'zero-copy' | 'user-copy', label: string): Promise<void> {
  const dev = await UblkDevice.create({ target, transport, depth: 16 });
  const id = String(dev.id);
  const fio = run('fio', ['--name=load', `--filename=${dev.path}`, '--direct=1', '--rw=randrw', '--bs=4k', '--ioengine=libaio',
    '--iodepth=8', '--size=16M', '--time_based', '--runtime=120']);
  const busy = await waitFor(() => dev.stats().fastIos + dev.stats().slowIos > 200, 60_000);
  check(busy, `${label}: load running (${dev.stats().fastIos + dev.stats().slowIos} requests)`);
  const t = Date.now();
  const r = await within(dev.delete().then(() => 'ok', (e) => (e as Error).message), 30_000);
  check(r === 'ok', `${label}: delete() under load resolved in ${Date.now() - t} ms (${r})`);
  const code = await within(fio.done, 30_000);
  if (code === 'timeout') fio.kill();
  check(code !== 'timeout' && code !== 0, `${label}: the load ended with an I/O error instead of hanging (fio exit ${code})`);
  const gone = await waitFor(() => !ublkDevices().some((d) => d === `ublkc${id}`), 10_000);
  check(gone, `${label}: kernel device ublkc${id} released after the opener exited`);
}

(async () => {
  const { f, t0 } = begin('ublk-lifecycle', DIR);
  const img = `${DIR}/backing.img`;
  scratchFile(img, 32 << 20);
  for (const transport of transports(f)) {
    for (const slow of [false, true]) {
      const target = FileTarget.open(img, { alwaysSlow: slow });
      try {
        await deleteUnderLoad(target, transport, `${transport}${slow ? ' slow-path' : ''}`);
      } catch (e) {
        check(false, `${transport}: ${(e as Error).message}`);
      }
      target.close();
    }
  }

  const target = FileTarget.open(img);
  const dev = await UblkDevice.create({ target });
  const holder = run('sh', ['-c', `exec 3<${dev.path}; exec sleep 30`]);
  await new Promise((r) => setTimeout(r, 500));
  const tried = await dev.stop({ try: true }).then(() => 'stopped', (e) => e as UblkError);
  if (f!.names.includes('SAFE_STOP_DEV')) {
    check(tried instanceof UblkError && tried.code === 'EBUSY', `TRY_STOP_DEV refuses an open device with EBUSY (${tried instanceof Error ? tried.message : tried})`);
    holder.kill();
    await holder.done;
    await new Promise((r) => setTimeout(r, 200));
    const again = await dev.stop({ try: true }).then(() => 'stopped', (e) => (e as Error).message);
    check(again === 'stopped', `TRY_STOP_DEV stops it once closed (${again})`);
  } else {
    check(tried instanceof UblkError && tried.code === 'ENOTSUP', `TRY_STOP_DEV reported unsupported before 7.0 (${tried instanceof Error ? tried.message : tried})`);
    holder.kill();
    await holder.done;
  }
  await dev.delete();

  if (!f!.zeroCopy) {
    const e = await UblkDevice.create({ target, transport: 'zero-copy' }).then(() => null, (x) => x as UblkError);
    check(e instanceof UblkError && e.code === 'ENOTSUP' && e.errno === 95, `zero-copy on a kernel without AUTO_BUF_REG: typed ENOTSUP (${e?.message})`);
  }
  target.close();
  finish('ublk-lifecycle', t0);
})().catch((e) => { console.error(e); process.exit(1); });
