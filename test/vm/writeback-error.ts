// Runs INSIDE the kernel test VM: a real lost writeback (hazard H6). The
// engine's cache directory sits on ext4 on a loop device whose backing file
// lives on a tmpfs smaller than the data written, so writes land in the page
// cache and fail only when the kernel writes them back. The kernel reports
// such an error once per open file; strata must keep failing afterwards:
//   - engine API: flush rejects with EIO, and so does a second flush, and a
//     snapshot (which could upload bytes the disk no longer has);
//   - through ublk: `dd conv=fsync` onto the device fails, and a second,
//     small `dd conv=fsync` fails too;
//   - through ublk with FUA writes (the I/O workers hand them to the
//     engine): once one fails, a later `dd conv=fsync` fails too.
import * as fs from 'fs';
import { Engine, Codec, StrataError } from '../../src/index';
import { serveUblk } from '../../src/ublk-export';
import type { UblkDevice, Transport } from '../../src/ublk';
import { check, sh, finish, begin, transports } from './ublk-helpers';

const DIR = '/tmp/strata-vm-wberr';
const MIB = 1 << 20;

/** ext4 on a loop device backed by a file on a 24 MiB tmpfs; returns its mount point and an undo. */
async function smallDisk(name: string): Promise<{ mnt: string; undo: () => Promise<void> }> {
  const t = `${DIR}/${name}-tmpfs`, mnt = `${DIR}/${name}`;
  fs.mkdirSync(t, { recursive: true });
  fs.mkdirSync(mnt, { recursive: true });
  await sh(`mount -t tmpfs -o size=24m tmpfs ${t} && truncate -s 256M ${t}/disk.img`);
  const loop = (await sh(`losetup -f --show ${t}/disk.img`)).trim();
  await sh(`mkfs.ext4 -q -F ${loop} && mount ${loop} ${mnt}`);
  return {
    mnt,
    undo: async () => {
      await sh(`umount -l ${mnt}; losetup -d ${loop}; umount -l ${t}`).catch(() => undefined);
    },
  };
}

/**
 * A strata device over ublk with its cache on a small disk: 48 MiB of dd
 * with `ddFlags` must fail, and so must a later small `dd conv=fsync`.
 */
async function throughUblk(name: string, transport: Transport, template: string, ddFlags: string, what: string): Promise<void> {
  const disk = await smallDisk(name);
  const engine = await Engine.open({ store: `${DIR}/store`, cacheDir: `${disk.mnt}/cache` });
  let u: UblkDevice | undefined;
  try {
    const dev = await engine.openDevice(template);
    u = await serveUblk(dev, { transport, queues: 1 });
    const big = await sh(`dd if=/dev/urandom of=${u.path} bs=1M count=48 ${ddFlags} status=none 2>&1; echo rc=$?`, 300_000);
    check(!/rc=0\s*$/.test(big), `${transport}: ${what} onto ${u.path} fails (${big.trim().split('\n').pop()})`);
    const small = await sh(`dd if=/dev/zero of=${u.path} bs=4k count=1 conv=fsync status=none 2>&1; echo rc=$?`, 120_000);
    check(!/rc=0\s*$/.test(small), `${transport}: a later small dd conv=fsync fails too (${small.trim().split('\n').pop()})`);
  } catch (e) {
    check(false, `${transport}: ${what}: ${(e as Error).message}`);
  } finally {
    await u?.delete().catch(() => undefined);
    await engine.close().catch(() => undefined);
    await disk.undo();
  }
}

async function errOf(p: Promise<unknown>): Promise<StrataError | undefined> {
  try { await p; } catch (e) { return e as StrataError; }
  return undefined;
}

(async () => {
  const { f, t0 } = begin('writeback-error', DIR);
  await sh(`truncate -s 64M ${DIR}/blank.img`);
  const imp = await Engine.open({ store: `${DIR}/store`, cacheDir: `${DIR}/cache-import` });
  const template = (await imp.importImage(`${DIR}/blank.img`, { codec: Codec.Lz4 })).id;
  await imp.close();

  // Engine API.
  const a = await smallDisk('a');
  const engine = await Engine.open({ store: `${DIR}/store`, cacheDir: `${a.mnt}/cache` });
  try {
    const dev = await engine.openDevice(template);
    const chunk = Buffer.alloc(MIB);
    let acked = 0;
    for (let i = 0; i < 48; i++) {
      chunk.fill(i + 1);
      const e = await errOf(dev.write(i * MIB, chunk));
      if (e) { console.log(`     write ${i} failed: ${e.message}`); break; }
      acked++;
    }
    check(acked >= 32, `${acked} MiB written into the page cache (more than the 24 MiB the disk can take)`);
    const first = await errOf(dev.flush());
    check(first?.code === 'EIO', `flush fails with EIO (${first?.message ?? 'it succeeded'})`);
    const second = await errOf(dev.flush());
    check(second?.code === 'EIO', `a second flush fails too, though the kernel reported the error once (${second?.message ?? 'it succeeded'})`);
    const snap = await errOf(dev.snapshot());
    check(snap?.code === 'EIO', `a snapshot is refused (${snap?.message ?? 'it succeeded'})`);
    await engine.closeDevice(dev).catch(() => undefined);
  } catch (e) {
    check(false, (e as Error).message);
  } finally {
    await engine.close().catch(() => undefined);
    await a.undo();
  }

  const transport = transports(f)[0];
  // Through ublk: the kernel's FLUSH after buffered writes.
  await throughUblk('b', transport, template, 'conv=fsync', 'dd conv=fsync of 48 MiB');
  // Through ublk with FUA writes (O_DSYNC on the device): the I/O workers
  // hand them to the engine, whose sync fails and sticks; the device's next
  // FLUSH must still fail.
  await throughUblk('c', transport, template, 'oflag=direct,dsync', 'dd oflag=direct,dsync (FUA writes) of 48 MiB');
  finish('writeback-error', t0);
})().catch((e) => { console.error(e); process.exit(1); });
