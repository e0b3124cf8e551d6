// Runs INSIDE the kernel test VM: UBLK_F_USER_RECOVERY. A child process
// serves a recovery-enabled device ('reissue' mode) and is killed with
// SIGKILL mid-workload; this process then recovers the device
// (START_USER_RECOVERY .. END_USER_RECOVERY) and the workload must finish
// with every byte in place. Three ways: dd writing a pattern (then cmp);
// a fio crc32c verify run; and the fio run with the server holding every
// tag when it dies (its slow path stops answering on SIGUSR2), so no fetch
// is left for the kernel to cancel — 6.12 then notices the death only by a
// request timing out, which strata shortens (UblkDevice.requestTimeoutMs).
import * as fs from 'fs';
import { UblkDevice, FileTarget } from '../../src/ublk';
import { check, sh, transports, scratchFile, finish, waitFor, startServer, serveUntilKilled, startDd, startFioVerify, begin } from './ublk-helpers';

const DIR = '/tmp/strata-vm-ublk-recovery';
const MIB = 24;
const DEPTH = 16; // = fio's iodepth, so a server can end up holding every tag

if (process.argv[2] === '--serve') {
  // Child: serve until killed. 'hold': every request takes the slow path,
  // which stops answering on SIGUSR2.
  const target = FileTarget.open(process.argv[3]);
  const hold = process.argv[5] === 'hold';
  let holding = false;
  process.on('SIGUSR2', () => { holding = true; });
  serveUntilKilled(() => UblkDevice.create({
    target, transport: process.argv[4] as 'user-copy', recovery: 'reissue', depth: DEPTH,
    ...(hold ? { alwaysSlow: true, onSlow: (r) => (holding ? new Promise<void>(() => undefined) : target.serveSlow(r)) } : {}),
  }));
} else {
  (async () => {
    const { f, t0 } = begin('ublk-recovery', DIR);
    await sh(`head -c ${MIB << 20} /dev/urandom > ${DIR}/pat`);
    for (const transport of transports(f)) {
      await acrossKill(transport, 'dd', false);
      await acrossKill(transport, 'fio', false);
      await acrossKill(transport, 'fio', true);
    }
    finish('ublk-recovery', t0);
  })().catch((e) => { console.error(e); process.exit(1); });
}

/** Kills the server during `work` (holding every tag first if `holdAll`), recovers the device here and checks the work finished intact. */
async function acrossKill(transport: 'zero-copy' | 'user-copy', work: 'dd' | 'fio', holdAll: boolean): Promise<void> {
  const what = `${transport}, ${work}${holdAll ? ', every tag held by the server' : ''}`;
  const img = `${DIR}/backing.img`;
  scratchFile(img, 64 << 20);
  const { child, id, line } = await startServer(__filename, [img, transport, holdAll ? 'hold' : 'serve']);
  if (!check(Number.isInteger(id), `${what}: server process created a recovery device (${line})`)) return;
  const path = `/dev/ublkb${id}`;
  const timeout = fs.readFileSync(`/sys/block/ublkb${id}/queue/io_timeout`, 'utf8').trim();
  check(timeout === '2000', `${what}: the device's request timeout is strata's 2 s (${timeout} ms)`);
  const fio = work === 'fio' ? startFioVerify(path, 16) : undefined;
  const load = fio ?? startDd(`${DIR}/pat`, path);
  await waitFor(() => fs.statSync(img).blocks * 512 > (2 << 20) || load.exited(), 60_000);
  if (holdAll) {
    child.kill('SIGUSR2');
    await new Promise((r) => setTimeout(r, 1000)); // fio keeps 16 requests queued: the server ends up holding all
  }
  child.kill('SIGKILL');
  await new Promise((r) => child.once('close', r));
  check(!load.exited() && fs.existsSync(path), `${what}: server killed with SIGKILL mid-run; ${path} survives it`);
  let dev: UblkDevice | undefined;
  try {
    const t = Date.now();
    dev = await UblkDevice.recover(id, { target: FileTarget.open(img) });
    const ms = Date.now() - t;
    check(dev.id === id && dev.transport === transport, `${what}: recovered device ${id} in ${ms} ms`);
    // Without the shorter timeout 6.12 took 31 s here (the block layer's 30 s).
    if (holdAll) check(ms < 15_000, `${what}: recovery did not wait for the kernel's 30 s request timeout`);
    const code = await Promise.race([load.done, new Promise<number>((r) => setTimeout(() => r(-2), 180_000))]);
    if (fio) {
      if (!check(fio.clean(code), `${what}: fio completed after recovery with no verify error (exit ${code})`)) console.log(fio.out().slice(-1500));
    } else {
      check(code === 0, `${what}: the interrupted dd completed successfully after recovery (exit ${code})`);
      const same = await sh(`cmp -n ${MIB << 20} ${DIR}/pat ${img} && echo same`).catch((e) => (e as Error).message);
      check(same.trim() === 'same', `${what}: all ${MIB} MiB written across the crash are in place`);
      const via = await sh(`dd if=${path} bs=1M count=${MIB} iflag=direct status=none | cmp - ${DIR}/pat && echo same`).catch((e) => (e as Error).message);
      check(via.trim() === 'same', `${what}: and read back through the recovered device`);
    }
  } catch (e) {
    check(false, `${what}: recovery: ${(e as Error).message}`);
    load.proc.kill('SIGKILL');
  } finally {
    await dev?.delete().catch((e) => check(false, `delete: ${(e as Error).message}`));
  }
}
