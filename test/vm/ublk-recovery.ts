// Runs INSIDE the kernel test VM: UBLK_F_USER_RECOVERY. A child process
// serves a recovery-enabled device ('reissue' mode) and is killed with
// SIGKILL while dd writes through the device; this process then recovers the
// device (START_USER_RECOVERY .. END_USER_RECOVERY) and the blocked dd must
// finish successfully with every byte in place. Then the same with a fio
// crc32c verify run killed mid-write: fio completes with no verify error.
import * as fs from 'fs';
import { UblkDevice, FileTarget } from '../../src/ublk';
import { check, sh, transports, scratchFile, finish, waitFor, startServer, serveUntilKilled, startDd, startFioVerify, begin } from './ublk-helpers';

const DIR = '/tmp/strata-vm-ublk-recovery';

if (process.argv[2] === '--serve') {
  // Child: serve until killed.
  serveUntilKilled(() => UblkDevice.create({ target: FileTarget.open(process.argv[3]), transport: process.argv[4] as 'user-copy', recovery: 'reissue', depth: 16 }));
} else {
  (async () => {
    const { f, t0 } = begin('ublk-recovery', DIR);
    const MIB = 24;
    await sh(`head -c ${MIB << 20} /dev/urandom > ${DIR}/pat`);
    for (const transport of transports(f)) {
      const img = `${DIR}/backing.img`;
      scratchFile(img, 64 << 20);
      const { child, id, line } = await startServer(__filename, [img, transport]);
      if (!check(Number.isInteger(id), `${transport}: server process created a recovery device (${line})`)) continue;
      const path = `/dev/ublkb${id}`;
      const dd = startDd(`${DIR}/pat`, path);
      await waitFor(() => fs.statSync(img).blocks * 512 > (2 << 20), 60_000);
      child.kill('SIGKILL');
      await new Promise((r) => child.once('close', r));
      check(!dd.exited(), `${transport}: server killed with SIGKILL while dd was still writing`);
      check(fs.existsSync(path), `${transport}: ${path} survives its server`);
      const t = Date.now();
      let dev: UblkDevice | undefined;
      try {
        dev = await UblkDevice.recover(id, { target: FileTarget.open(img) });
        check(dev.id === id && dev.transport === transport, `${transport}: recovered device ${id} in ${Date.now() - t} ms`);
        const code = await Promise.race([dd.done, new Promise<number>((r) => setTimeout(() => r(-2), 120_000))]);
        check(code === 0, `${transport}: the interrupted dd completed successfully after recovery (exit ${code})`);
        const same = await sh(`cmp -n ${MIB << 20} ${DIR}/pat ${img} && echo same`).catch((e) => (e as Error).message);
        check(same.trim() === 'same', `${transport}: all ${MIB} MiB written across the crash are in place`);
        const via = await sh(`dd if=${path} bs=1M count=${MIB} iflag=direct status=none | cmp - ${DIR}/pat && echo same`).catch((e) => (e as Error).message);
        check(via.trim() === 'same', `${transport}: and read back through the recovered device`);
      } catch (e) {
        check(false, `${transport}: recovery: ${(e as Error).message}`);
        dd.proc.kill('SIGKILL');
      } finally {
        await dev?.delete().catch((e) => check(false, `delete: ${(e as Error).message}`));
      }
      await fioAcrossKill(transport);
    }
    finish('ublk-recovery', t0);
  })().catch((e) => { console.error(e); process.exit(1); });
}

/** SIGKILL of the server during a fio verify run; this process recovers the device; fio must finish clean. */
async function fioAcrossKill(transport: 'zero-copy' | 'user-copy'): Promise<void> {
  const img = `${DIR}/fio.img`;
  scratchFile(img, 64 << 20);
  const { child, id, line } = await startServer(__filename, [img, transport]);
  if (!check(Number.isInteger(id), `${transport}: server process created a recovery device for fio (${line})`)) return;
  const path = `/dev/ublkb${id}`;
  const fio = startFioVerify(path, 16);
  await waitFor(() => fs.statSync(img).blocks * 512 > (2 << 20) || fio.exited(), 60_000);
  child.kill('SIGKILL');
  await new Promise((r) => child.once('close', r));
  check(!fio.exited(), `${transport}: server killed with SIGKILL during the fio verify run`);
  let dev: UblkDevice | undefined;
  try {
    const t = Date.now();
    dev = await UblkDevice.recover(id, { target: FileTarget.open(img) });
    console.log(`     ${transport}: recovered under fio in ${Date.now() - t} ms`);
    const code = await Promise.race([fio.done, new Promise<number>((r) => setTimeout(() => r(-2), 180_000))]);
    if (!check(fio.clean(code), `${transport}: fio completed after recovery with no verify error (exit ${code})`)) console.log(fio.out().slice(-1500));
  } catch (e) {
    check(false, `${transport}: recovery under fio: ${(e as Error).message}`);
    fio.proc.kill('SIGKILL');
  } finally {
    await dev?.delete().catch((e) => check(false, `delete: ${(e as Error).message}`));
  }
}
