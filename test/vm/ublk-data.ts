// Runs INSIDE the kernel test VM: data integrity through /dev/ublkbN on a
// FileTarget, for every transport the kernel offers, served by the I/O
// workers and with every request forced through the main thread's slow path:
// O_DIRECT pattern write/read (4 MiB, 32 MiB), 512-byte unaligned I/O,
// concurrent readers and verifying writers on the same blocks (H1/H16),
// FLUSH/DISCARD, and (fast path) mkfs.ext4 + mount + files + umount + fsck;
// plus multi-segment plans on a strata device (template, overlay and zero
// pieces in one request).
// STRATA_UBLK_SMOKE=1 keeps only the 4 MiB pattern and the unaligned I/O.
import * as fs from 'fs';
import * as crypto from 'crypto';
import { UblkDevice, FileTarget } from '../../src/ublk';
import { Engine, Codec } from '../../src/index';
import { serveUblk } from '../../src/ublk-export';
import { check, sh, skip, transports, scratchFile, finish, begin } from './ublk-helpers';

const smoke = process.env.STRATA_UBLK_SMOKE === '1';
const DIR = '/tmp/strata-vm-ublk';
const SIZE = 64 << 20;

async function patternRoundTrip(dev: UblkDevice, img: string, mib: number, label: string): Promise<void> {
  const pat = `${DIR}/pat${mib}`;
  await sh(`head -c ${mib << 20} /dev/urandom > ${pat}`);
  await sh(`dd if=${pat} of=${dev.path} bs=1M oflag=direct conv=fsync status=none`);
  await sh(`dd if=${dev.path} of=${DIR}/back bs=1M count=${mib} iflag=direct status=none`);
  const viaDev = await sh(`cmp ${pat} ${DIR}/back && echo same`).catch(() => 'differ');
  const inFile = await sh(`cmp -n ${mib << 20} ${pat} ${img} && echo same`).catch(() => 'differ');
  check(viaDev.trim() === 'same' && inFile.trim() === 'same', `${label}: ${mib} MiB O_DIRECT pattern reads back (device and backing file)`);
}

async function unaligned(dev: UblkDevice, img: string, label: string): Promise<void> {
  // 3 sectors at sector 7 and 1 sector at sector 4097: sub-4K, odd offsets.
  await sh(`head -c 1536 /dev/urandom > ${DIR}/u1; head -c 512 /dev/urandom > ${DIR}/u2`);
  // One 1536-byte request at byte 3584 (not 4 KiB aligned, crosses a 4 KiB block).
  await sh(`dd if=${DIR}/u1 of=${dev.path} bs=1536 seek=3584 count=1 oflag=direct,seek_bytes status=none`);
  await sh(`dd if=${DIR}/u2 of=${dev.path} bs=512 seek=4097 count=1 oflag=direct status=none`);
  await sh(`dd if=${dev.path} of=${DIR}/r1 bs=1536 skip=3584 count=1 iflag=direct,skip_bytes status=none; dd if=${dev.path} of=${DIR}/r2 bs=512 skip=4097 count=1 iflag=direct status=none`);
  const a = await sh(`cmp ${DIR}/u1 ${DIR}/r1 && cmp ${DIR}/u2 ${DIR}/r2 && echo same`).catch(() => 'differ');
  const f = await sh(`cmp -n 1536 ${DIR}/u1 ${img} 0 3584 && cmp -n 512 ${DIR}/u2 ${img} 0 2097664 && echo same`).catch(() => 'differ');
  check(a.trim() === 'same' && f.trim() === 'same', `${label}: 512-byte unaligned writes/reads land on the right sectors`);
}

async function concurrent(dev: UblkDevice, img: string, label: string): Promise<void> {
  // Verifying writers and plain readers hammer the same 1 MiB: a reply or
  // staging buffer shared between requests shows up as a verify failure.
  const common = `--filename=${dev.path} --direct=1 --ioengine=psync --size=1M --offset=0 --bs=4k`;
  const out = await sh(`fio --output-format=terse --minimal ` +
    `--name=w ${common} --rw=randwrite --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --loops=3 --randrepeat=0 ` +
    `--name=r1 ${common} --rw=randread --loops=6 ` +
    `--name=r2 ${common} --rw=read --loops=6 2>&1; echo rc=$?`, 600_000).catch((e) => (e as Error).message);
  check(/rc=0\s*$/.test(out) && !/verify|bad|error/i.test(out.replace(/rc=0\s*$/, '').split('\n').filter((l) => !l.includes(';')).join('\n')),
    `${label}: concurrent verifying writers and readers on the same blocks (fio crc32c verify)`);
  if (!/rc=0\s*$/.test(out)) console.log(out.slice(-2000));
  // The backing file must hold exactly what the device returns.
  await sh(`dd if=${dev.path} of=${DIR}/c bs=1M count=1 iflag=direct status=none`);
  const same = await sh(`cmp -n 1048576 ${DIR}/c ${img} && echo same`).catch(() => 'differ');
  check(same.trim() === 'same', `${label}: device and backing file agree after the concurrent run`);
}

async function flushDiscard(dev: UblkDevice, img: string, label: string, slow: boolean): Promise<void> {
  const before = dev.stats().slowIos;
  await sh(`head -c 131072 /dev/urandom | dd of=${dev.path} bs=64k seek=100 oflag=direct conv=fsync status=none`);
  await sh(`blkdiscard -o ${100 * 65536} -l 65536 ${dev.path}`);
  await sh(`blkdiscard -z -o ${101 * 65536} -l 4096 ${dev.path}`);
  const isZero = (cmd: string, n = 65536) => sh(`${cmd} | cmp -n ${n} - /dev/zero && echo zero`).then((o) => o.trim() === 'zero', () => false);
  check(await isZero(`dd if=${dev.path} bs=64k skip=100 count=1 iflag=direct status=none`), `${label}: a discarded range reads as zeros through the device`);
  check(await isZero(`dd if=${img} bs=64k skip=100 count=1 status=none`), `${label}: and in the backing file`);
  check(await isZero(`dd if=${dev.path} bs=4k skip=${101 * 16} count=1 iflag=direct status=none`, 4096), `${label}: a write-zeroes range reads as zeros`);
  const rest = await sh(`dd if=${dev.path} bs=4k skip=${101 * 16 + 1} count=1 iflag=direct status=none | cmp -n 4096 - /dev/zero && echo zero`).catch(() => 'data');
  check(rest.trim() !== 'zero', `${label}: and the block after it kept its data`);
  // A FileTarget's FLUSH, DISCARD and WRITE_ZEROES are one fdatasync or fallocate on the worker's ring.
  const moved = dev.stats().slowIos - before;
  check(slow ? moved > 0 : moved === 0, `${label}: flush, discard and write-zeroes served ${slow ? 'by the main thread' : 'on the I/O worker'} (${moved} to the main thread)`);
}

async function filesystem(dev: UblkDevice, label: string): Promise<void> {
  const mnt = `${DIR}/mnt`;
  fs.mkdirSync(mnt, { recursive: true });
  await sh(`mkfs.ext4 -q -F ${dev.path}`);
  await sh(`mount ${dev.path} ${mnt}`);
  await sh(`set -e; cd ${mnt}; for i in $(seq 0 11); do head -c $((4096 + i * 99991)) /dev/urandom > f$i; done; sha256sum f* > ${DIR}/sums; sync`);
  await sh(`umount ${mnt}`);
  const fsck = await sh(`fsck.ext4 -n -f ${dev.path} >/dev/null 2>&1 && echo clean`).catch(() => 'dirty');
  await sh(`mount -o ro ${dev.path} ${mnt}`);
  const ok = await sh(`cd ${mnt} && sha256sum -c ${DIR}/sums | grep -c ': OK$'`).catch((e) => (e as Error).message);
  await sh(`umount ${mnt}`);
  check(fsck.trim() === 'clean' && ok.trim() === '12', `${label}: mkfs.ext4 + mount + 12 files + umount + fsck clean + sha256 (${ok.trim()}/12)`);
}

/**
 * Multi-segment plans through the engine's one planner: a strata device
 * whose 16 KiB pieces alternate template data, overlay data and zeros, so
 * one request crosses several segments of different kinds (file pieces
 * into the request at their offsets, zeros filled or, under zero copy,
 * read from /dev/zero).
 */
async function segmented(transport: 'zero-copy' | 'user-copy'): Promise<void> {
  const label = `${transport} segmented`;
  const MB = 8, PIECE = 16384;
  const data = crypto.randomBytes(MB << 20);
  fs.writeFileSync(`${DIR}/seg.img`, data);
  const engine = await Engine.open({ store: `${DIR}/seg-store-${transport}`, cacheDir: `${DIR}/seg-cache-${transport}` });
  let dev: UblkDevice | undefined;
  try {
    const layer = await engine.importImage(`${DIR}/seg.img`, { codec: Codec.Lz4 });
    const d = await engine.openDevice(layer.id, { id: `seg-${transport}` });
    const model = Buffer.from(data);
    for (let o = 0, i = 0; o < model.length; o += PIECE, i++) {
      if (i % 3 === 1) { const b = crypto.randomBytes(PIECE); await d.write(o, b); b.copy(model, o); }
      if (i % 3 === 2) { await d.writeZeroes(o, PIECE); model.fill(0, o, o + PIECE); }
    }
    dev = await serveUblk(d, { transport, queues: 2, depth: 16 });
    // The first pass fetches the template's frames (the slow path); the second is planned on the I/O workers.
    await sh(`dd if=${dev.path} of=/dev/null bs=1M iflag=direct status=none`);
    const before = dev.stats();
    await sh(`dd if=${dev.path} of=${DIR}/segback bs=64k count=${MB * 16} iflag=direct status=none`);
    check(fs.readFileSync(`${DIR}/segback`).equals(model), `${label}: 64 KiB reads across template, overlay and zero pieces read back exactly`);
    const mid = dev.stats();
    check(mid.slowIos === before.slowIos && mid.fastIos - before.fastIos >= MB * 16, `${label}: all planned on the I/O workers once cached (fast ${mid.fastIos - before.fastIos}, slow ${mid.slowIos - before.slowIos})`);
    // One 71-sector request starting at sector 29: it crosses 4 pieces.
    await sh(`dd if=${dev.path} of=${DIR}/segu bs=${71 * 512} count=1 skip=${29 * 512} iflag=direct,skip_bytes status=none`);
    check(fs.readFileSync(`${DIR}/segu`).equals(model.subarray(29 * 512, 100 * 512)), `${label}: a 512-byte-aligned read across piece boundaries`);
    const w = crypto.randomBytes(1 << 20);
    fs.writeFileSync(`${DIR}/segw`, w);
    await sh(`dd if=${DIR}/segw of=${dev.path} bs=64k seek=64 oflag=direct conv=fsync status=none`);
    w.copy(model, 4 << 20);
    await sh(`dd if=${dev.path} of=${DIR}/segback bs=1M count=${MB} iflag=direct status=none`);
    check(fs.readFileSync(`${DIR}/segback`).equals(model), `${label}: writes over every kind of piece read back`);
    check((await d.read(0, MB << 20)).equals(model), `${label}: and the engine's device holds them`);
  } catch (e) {
    check(false, `${label}: ${(e as Error).message}`);
  } finally {
    await dev?.delete().catch((e) => check(false, `${label}: delete: ${(e as Error).message}`));
    await engine.close().catch(() => undefined);
  }
}

(async () => {
  const { f, t0 } = begin('ublk-data', DIR);
  for (const transport of transports(f)) {
    for (const slow of [false, true]) {
      const label = `${transport}${slow ? ' slow-path' : ''}`;
      const img = `${DIR}/backing.img`;
      scratchFile(img, SIZE);
      const target = FileTarget.open(img, { alwaysSlow: slow });
      let dev: UblkDevice | undefined;
      try {
        dev = await UblkDevice.create({ target, transport, depth: 32, queues: 2 });
        check(dev.transport === transport && fs.existsSync(dev.path), `${label}: ${dev.path} created (${dev.info.createMs.toFixed(1)} ms)`);
        // The workers serving it are I/O flushers (PF_MEMALLOC_NOIO, 0x80000): their reclaim never waits on writeback through it.
        const noio = fs.readdirSync('/proc/self/task').filter((t) => {
          const st = fs.readFileSync(`/proc/self/task/${t}/stat`, 'utf8');
          return (Number(st.slice(st.lastIndexOf(')') + 2).split(' ')[6]) & 0x80000) !== 0;
        }).length;
        check(noio >= 1, `${label}: ${noio} threads of this process are I/O flushers (the I/O workers)`);
        await patternRoundTrip(dev, img, 4, label);
        await unaligned(dev, img, label);
        if (!smoke) {
          await patternRoundTrip(dev, img, 32, label);
          await concurrent(dev, img, label);
          await flushDiscard(dev, img, label, slow);
          if (!slow) await filesystem(dev, label);
        }
        if (transport === 'zero-copy' && slow) {
          // Every request passed through the workers' staging files: none keeps the pages.
          const staged = fs.readdirSync('/proc/self/fd').map((fd) => {
            try { return fs.readlinkSync(`/proc/self/fd/${fd}`).includes('strata-stage-') ? fs.fstatSync(Number(fd)).blocks * 512 : 0; } catch { return 0; }
          }).reduce((a, b) => a + b, 0);
          check(staged < (1 << 20), `${label}: the staging files keep no pages once the requests are done (${(staged / 1048576).toFixed(1)} MiB held)`);
        }
        const st = dev.stats();
        // FUA writes are a FileTarget's slow path (serveSlow) either way.
        check(slow ? st.fastIos === 0 && st.slowReadWrites > 0 : st.slowReadWrites === 0 && st.fastIos > 0,
          `${label}: reads and writes took the ${slow ? 'slow' : 'fast'} path (fast ${st.fastIos}, slow ${st.slowIos}, of them reads and writes ${st.slowReadWrites})`);
      } catch (e) {
        check(false, `${label}: ${(e as Error).message}`);
      } finally {
        await dev?.delete().catch((e) => check(false, `${label}: delete: ${(e as Error).message}`));
        target.close();
      }
    }
  }
  for (const transport of transports(f)) await segmented(transport);
  if (!smoke) skip('mkfs/mount on the slow path (fast path only, to keep the lane short)');
  finish('ublk-data', t0);
})().catch((e) => { console.error(e); process.exit(1); });
