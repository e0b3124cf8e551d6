// Runs INSIDE the kernel test VM: cold wake plus random-write verify
// (hazards H20 and H16), on every transport the kernel offers. A strata
// device is opened on a template of random bytes with an empty cache (as on
// a host that never saw it: every first read fetches a frame from the store)
// and served over ublk. fio then writes the first half with random sizes
// from 512 bytes to 16 KiB (sub-block writes need the old block, i.e. a cold
// fetch, merged under the new bytes) and verifies every write (crc32c),
// while dd reads the whole device at once so fetches race the writes. The
// untouched half must still be the template's bytes. Then the device is
// snapshotted and the snapshot resumed cold on another empty cache: fio
// verifies the same writes again (--verify_only) and the rest is the template.
import * as fs from 'fs';
import { Engine, Codec } from '../../src/index';
import { serveUblk } from '../../src/ublk-export';
import type { UblkDevice, Transport } from '../../src/ublk';
import { check, sh, transports, finish, begin } from './ublk-helpers';

const DIR = '/tmp/strata-vm-ublk-cold';
const MIB = 32, HALF = MIB / 2;

/** The fio job: same seed and sizes each time, so --verify_only re-checks the same writes. */
const fioJob = (dev: string, verifyOnly: boolean) =>
  `fio --name=cold --filename=${dev} --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite ` +
  `--bsrange=512-16k --blockalign=512 --size=${HALF}M --randrepeat=1 --randseed=4242 ` +
  `--verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0${verifyOnly ? ' --verify_only' : ''} 2>&1; echo rc=$?`;

const fioClean = (out: string) => /rc=0\s*$/.test(out) && !/verify: bad|crc32c: wanted|err=\s*[1-9]/i.test(out);

/** Whether bytes [HALF MiB, MIB MiB) of the device equal the template's. */
async function restIsTemplate(dev: string): Promise<boolean> {
  const out = await sh(`dd if=${dev} bs=1M skip=${HALF} count=${HALF} iflag=direct status=none | cmp - ${DIR}/tail.img && echo same`)
    .catch((e) => (e as Error).message);
  return out.trim() === 'same';
}

async function coldWake(transport: Transport, template: string): Promise<void> {
  const e1 = await Engine.open({ store: `${DIR}/store`, cacheDir: `${DIR}/cold1-${transport}` });
  let e2: Engine | undefined;
  let u: UblkDevice | undefined;
  try {
    const dev = await e1.openDevice(template, { id: `cold-${transport}` });
    u = await serveUblk(dev, { transport, queues: 2 });
    const reader = sh(`dd if=${u.path} of=/dev/null bs=64k iflag=direct status=none && echo read`, 600_000).catch((e) => (e as Error).message);
    const out = await sh(fioJob(u.path, false), 600_000).catch((e) => (e as Error).message);
    if (!check(fioClean(out), `${transport}: fio random writes (512 B–16 KiB) on a cold device verify, with reads racing the fetches`)) console.log(out.slice(-1500));
    check((await reader).trim() === 'read', `${transport}: the concurrent whole-device read completed`);
    check(await restIsTemplate(u.path), `${transport}: the half fio did not touch reads as the template`);
    const st = dev.stats as unknown as Record<string, number>;
    console.log(`     ${transport}: device stats ${JSON.stringify(st)}; native ${JSON.stringify(dev.nativeStats())}`);
    await u.delete(); u = undefined;
    const snap = await dev.snapshot();
    await e1.closeDevice(dev);

    // Resume the snapshot on a host with nothing cached.
    e2 = await Engine.open({ store: `${DIR}/store`, cacheDir: `${DIR}/cold2-${transport}` });
    const dev2 = await e2.openDevice(snap.id, { id: `wake-${transport}` });
    u = await serveUblk(dev2, { transport, queues: 2 });
    const again = await sh(fioJob(u.path, true), 600_000).catch((e) => (e as Error).message);
    if (!check(fioClean(again), `${transport}: after snapshot and a cold resume, fio --verify_only finds every write`)) console.log(again.slice(-1500));
    check(await restIsTemplate(u.path), `${transport}: and the rest is still the template`);
  } catch (e) {
    check(false, `${transport}: ${(e as Error).message}`);
  } finally {
    await u?.delete().catch(() => undefined);
    await e1.close().catch(() => undefined);
    await e2?.close().catch(() => undefined);
  }
}

(async () => {
  const { f, t0 } = begin('ublk-cold', DIR);
  await sh(`head -c ${MIB << 20} /dev/urandom > ${DIR}/template.img && tail -c ${HALF << 20} ${DIR}/template.img > ${DIR}/tail.img`);
  const e = await Engine.open({ store: `${DIR}/store`, cacheDir: `${DIR}/cache-import` });
  const template = (await e.importImage(`${DIR}/template.img`, { codec: Codec.Lz4 })).id;
  await e.close();
  fs.rmSync(`${DIR}/cache-import`, { recursive: true, force: true });
  for (const transport of transports(f)) await coldWake(transport, template);
  finish('ublk-cold', t0);
})().catch((e) => { console.error(e); process.exit(1); });
