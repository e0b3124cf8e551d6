// Runs INSIDE the kernel test VM: strata devices served over ublk through
// the engine's gate (src/ublk-export.ts), on every transport the
// kernel offers:
//   - an ext4 template: mount, check its files, write more, umount, snapshot,
//     resume the snapshot on a new ublk device, every file's sha256, fsck;
//   - (full lane) a durable device whose server is SIGKILLed while dd writes:
//     another process resumes the device and recovers the ublk device, dd
//     completes and every byte is in place.
import * as fs from 'fs';
import { Engine, Codec } from '../../src/index';
import { serveUblk, recoverUblk } from '../../src/ublk-export';
import type { UblkDevice, Transport } from '../../src/ublk';
import { check, sh, transports, finish, waitFor, skip, startServer, serveUntilKilled, startDd, begin } from './ublk-helpers';

const DIR = '/tmp/strata-vm-ublk-strata';
const SMOKE = process.env.STRATA_UBLK_SMOKE === '1';

async function sums(mnt: string): Promise<string> {
  return (await sh(`cd ${mnt} && find . -type f ! -path './lost+found/*' | sort | xargs sha256sum`)).trim();
}

async function fsAndSnapshot(transport: Transport, template: string): Promise<void> {
  const engine = await Engine.open({ store: `${DIR}/store`, cacheDir: `${DIR}/cache-${transport}` });
  let u: UblkDevice | undefined, u2: UblkDevice | undefined;
  const mnt = `${DIR}/mnt`;
  fs.mkdirSync(mnt, { recursive: true });
  try {
    const dev = await engine.openDevice(template, { id: `fs-${transport}` });
    u = await serveUblk(dev, { transport, queues: 2 });
    check(u.transport === transport, `${transport}: strata device on ${u.path}`);
    await sh(`mount ${u.path} ${mnt}`);
    const base = await sums(mnt);
    check(base.includes('./etc/hostname'), `${transport}: the template's files are there`);
    await sh(`mkdir -p ${mnt}/new && for i in 1 2 3; do head -c $((300000 * i)) /dev/urandom > ${mnt}/new/f$i; done && cp -r ${mnt}/etc ${mnt}/etc2 && sync`);
    const before = await sums(mnt);
    await sh(`umount ${mnt}`);
    const st = dev.nativeStats();
    check(st.fastReads > 0 && st.fastWrites > 0, `${transport}: the I/O workers served reads and writes (${JSON.stringify(st)})`);
    await u.delete(); u = undefined;
    const snap = await dev.snapshot();
    await engine.closeDevice(dev);
    const dev2 = await engine.openDevice(snap.id, { id: `fs2-${transport}` });
    u2 = await serveUblk(dev2, { transport });
    const fsck = await sh(`fsck.ext4 -fn ${u2.path} >/dev/null 2>&1 && echo clean || echo dirty`);
    check(fsck.trim() === 'clean', `${transport}: fsck of the resumed snapshot is clean`);
    await sh(`mount ${u2.path} ${mnt}`);
    const after = await sums(mnt);
    check(after === before && after.split('\n').length >= 6, `${transport}: every file's sha256 matches after snapshot + resume (${after.split('\n').length} files)`);
    await sh(`umount ${mnt}`);
  } catch (e) {
    check(false, `${transport}: ${(e as Error).message}`);
    await sh(`umount ${mnt}`).catch(() => undefined);
  } finally {
    await u?.delete().catch(() => undefined);
    await u2?.delete().catch(() => undefined);
    await engine.close();
  }
}

// A device's overlay is deleted when the device closes; its space must come
// back once the ublk device is gone too (no file kept alive by a queue ring).
async function spaceReturned(transport: Transport, template: string): Promise<void> {
  const cache = `${DIR}/cache-space-${transport}`;
  const engine = await Engine.open({ store: `${DIR}/store`, cacheDir: cache });
  let u: UblkDevice | undefined;
  try {
    const free = () => { const st = fs.statfsSync(cache); return st.bavail * st.bsize; };
    const before = free();
    const dev = await engine.openDevice(template, { id: `space-${transport}` });
    u = await serveUblk(dev, { transport, queues: 2 });
    await sh(`dd if=${DIR}/pat of=${u.path} bs=1M oflag=direct status=none`);
    const used = before - free();
    check(used >= (12 << 20), `${transport}: 16 MiB written went into the overlay (${(used / 1048576).toFixed(1)} MiB used)`);
    await u.delete(); u = undefined;
    await engine.closeDevice(dev);
    const left = fs.readdirSync(`${cache}/devices`).filter((n) => n.includes('overlay'));
    check(left.length === 0, `${transport}: the closed device's overlay file is gone (${left.join(', ') || 'none left'})`);
    // Compared with the space in use just before closing: the template cache
    // may keep frames fetched meanwhile (the kernel probes a new disk's
    // partition table), the overlay's 16 MiB must come back.
    let freed = 0;
    await waitFor(() => { freed = used - (before - free()); return freed >= (15 << 20); }, 5_000);
    check(freed >= (15 << 20), `${transport}: its space is free again once the ublk device is deleted (${(freed / 1048576).toFixed(1)} MiB freed)`);
  } catch (e) {
    check(false, `${transport}: space: ${(e as Error).message}`);
  } finally {
    await u?.delete().catch(() => undefined);
    await engine.close();
  }
}

async function crashRecovery(transport: Transport, template: string): Promise<void> {
  const MIB = 16;
  const cache = `${DIR}/cache-rec-${transport}`;
  const { child, id, line } = await startServer(__filename, [template, transport, cache]);
  if (!check(Number.isInteger(id), `${transport}: a server process serves a durable strata device with recovery (${line})`)) return;
  const path = `/dev/ublkb${id}`;
  const dd = startDd(`${DIR}/pat`, path);
  // Kill once a good part of the data went through the overlay.
  await waitFor(() => { try { return fs.statSync(`${cache}/devices/crash.0.overlay`).blocks * 512 > (3 << 20); } catch { return false; } }, 120_000);
  child.kill('SIGKILL');
  await new Promise((r) => child.once('close', r));
  check(!dd.exited(), `${transport}: server killed with SIGKILL while dd was still writing`);
  const engine = await Engine.open({ store: `${DIR}/store`, cacheDir: cache });
  let u: UblkDevice | undefined;
  try {
    const dev = await engine.resumeDevice('crash');
    u = await recoverUblk(id, dev);
    check(u.id === id, `${transport}: this process resumed the device and recovered ${path}`);
    const code = await Promise.race([dd.done, new Promise<number>((r) => setTimeout(() => r(-2), 180_000))]);
    check(code === 0, `${transport}: the interrupted dd completed after recovery (exit ${code})`);
    const same = await sh(`dd if=${path} bs=1M count=${MIB} iflag=direct status=none | cmp - ${DIR}/pat && echo same`).catch((e) => (e as Error).message);
    check(same.trim() === 'same', `${transport}: all ${MIB} MiB written across the crash read back`);
    const viaEngine = await dev.read(0, MIB << 20);
    check(viaEngine.equals(fs.readFileSync(`${DIR}/pat`)), `${transport}: and the engine's device holds them`);
  } catch (e) {
    check(false, `${transport}: recovery: ${(e as Error).message}`);
    dd.proc.kill('SIGKILL');
  } finally {
    await u?.delete().catch(() => undefined);
    await engine.close().catch(() => undefined);
  }
}

if (process.argv[2] === '--serve') {
  serveUntilKilled(async () => {
    const [template, transport, cache] = process.argv.slice(3);
    const engine = await Engine.open({ store: `${DIR}/store`, cacheDir: cache });
    const dev = await engine.openDevice(template, { id: 'crash', durable: true });
    return serveUblk(dev, { transport: transport as Transport, recovery: 'reissue', depth: 16, queues: 1 });
  });
} else {
  (async () => {
    const { f, t0 } = begin('ublk-strata', DIR);
    fs.mkdirSync(`${DIR}/tree/etc`, { recursive: true });
    fs.writeFileSync(`${DIR}/tree/etc/hostname`, 'strata-template\n');
    await sh(`cp -r /usr/share/doc/busybox* /usr/share/doc/e2fsprogs ${DIR}/tree/etc/ 2>/dev/null; head -c 2000000 /dev/urandom > ${DIR}/tree/blob`);
    await sh(`mkfs.ext4 -q -F -d ${DIR}/tree ${DIR}/template.img 48M`);
    await sh(`head -c ${16 << 20} /dev/urandom > ${DIR}/pat`);
    const e = await Engine.open({ store: `${DIR}/store`, cacheDir: `${DIR}/cache-import` });
    const template = (await e.importImage(`${DIR}/template.img`, { codec: Codec.Lz4 })).id;
    await e.close();
    check(/^[0-9a-f]{32}$/.test(template), `imported an ext4 template ${template}`);
    for (const transport of transports(f)) {
      await fsAndSnapshot(transport, template);
      await spaceReturned(transport, template);
      if (SMOKE) skip(`${transport}: crash recovery (full lane only)`);
      else await crashRecovery(transport, template);
    }
    finish('ublk-strata', t0);
  })().catch((e) => { console.error(e); process.exit(1); });
}
