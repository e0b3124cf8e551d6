// Runs INSIDE the kernel test VM, twice over one virtio disk, with a power
// cut between the runs (driven by test/vm/reboot.sh): the template
// cache survives a host reboot.
//
//   boot 1: ext4 on the disk holds a local-directory store and the engine's
//     cache directory. A template is imported (its own cache elsewhere), then
//     a fresh engine reads the first half of a device on it (frames fetched
//     from the store) and waits until the cache says they are persisted; it
//     writes down how many, reads the second half (fetched, not yet
//     persisted) and cuts the power at once (sysrq b: no sync, the page
//     cache is lost, QEMU exits).
//   boot 2: a new engine on the same cache directory (its lock names a
//     process of the last boot) reads the whole device: every byte right,
//     every persisted frame used from disk without a fetch, and no restored
//     frame fails verification (a frame is journaled only after its bytes
//     are durable).
import * as fs from 'fs';
import { Engine, Codec } from '../../src/index';
import { CountingStore, makeImage } from '../helpers/util';
import { check, sh, finish, waitFor } from './ublk-helpers';

const DISK = process.env.STRATA_REBOOT_DISK ?? '/dev/vda';
const MNT = '/tmp/strata-reboot';
const MiB = 1 << 20;
const IMAGE = makeImage(48 * MiB / 4096, 4242);
const HALF = IMAGE.length / 2;

async function boot1(): Promise<void> {
  await sh(`mkfs.ext4 -q -F ${DISK} && mkdir -p ${MNT} && mount ${DISK} ${MNT}`);
  fs.writeFileSync('/tmp/reboot.img', IMAGE);
  const imp = await Engine.open({ store: `${MNT}/store`, cacheDir: '/tmp/reboot-import' });
  const { id, header } = await imp.importImage('/tmp/reboot.img', { codec: Codec.Zstd });
  await imp.close();
  await sh('sync');

  const store = new CountingStore(`${MNT}/store`);
  const e = await Engine.open({ store, cacheDir: `${MNT}/data`, profiles: false });
  const d = await e.openDevice(id);
  check((await d.read(0, HALF)).equals(IMAGE.subarray(0, HALF)), 'boot 1: the first half of the device reads right (fetched from the store)');
  // Readahead may still be fetching: wait until what was fetched is persisted and stays so.
  let last = -1;
  const settled = await waitFor(() => {
    const p = e.stats().cache.persistedFrames;
    const ok = p === store.gets && p === last;
    last = p;
    return ok && p > 0;
  }, 60_000);
  const persisted = e.stats().cache.persistedFrames;
  check(settled, `boot 1: ${persisted} fetched frames persisted (store gets ${store.gets})`);
  const fd = fs.openSync(`${MNT}/boot1.json`, 'w');
  fs.writeSync(fd, JSON.stringify({ id, frames: header.frames.length, persisted }));
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  const dfd = fs.openSync(MNT, 'r');
  fs.fsyncSync(dfd);
  fs.closeSync(dfd);
  const before = store.gets;
  check((await d.read(HALF, IMAGE.length - HALF)).equals(IMAGE.subarray(HALF)), 'boot 1: the second half reads right');
  console.log(`     boot 1: ${store.gets - before} more frames fetched; cutting the power now (frames of ${header.frames.length})`);
  console.log(`BOOT1-DONE ${JSON.stringify({ passed: true })}`);
  fs.writeFileSync('/proc/sysrq-trigger', 'b');
  await new Promise((r) => setTimeout(r, 60_000));
  check(false, 'boot 1: the power cut did not happen');
}

async function boot2(): Promise<void> {
  await sh(`mkdir -p ${MNT} && mount ${DISK} ${MNT}`);
  const b1 = JSON.parse(fs.readFileSync(`${MNT}/boot1.json`, 'utf8')) as { id: string; frames: number; persisted: number };
  const lock = `${MNT}/data/engine.lock`;
  console.log(`     boot 2: the engine lock of boot 1 ${fs.existsSync(lock) ? `says ${JSON.stringify(fs.readFileSync(lock, 'utf8'))}` : 'is gone'}`);
  const store = new CountingStore(`${MNT}/store`);
  const e = await Engine.open({ store, cacheDir: `${MNT}/data`, profiles: false });
  try {
    const d = await e.openDevice(b1.id);
    check((await d.read(0, IMAGE.length)).equals(IMAGE), 'boot 2: the whole device reads right');
    const s = e.stats().cache;
    check(s.restoreFailures === 0, `boot 2: no frame restored from disk failed verification (${s.restoreFailures})`);
    check(s.restoredFrames >= b1.persisted, `boot 2: the ${b1.persisted} frames persisted before the power cut are used from disk (${s.restoredFrames} restored)`);
    check(store.gets + s.restoredFrames === b1.frames, `boot 2: every other frame fetched once (${store.gets} fetched + ${s.restoredFrames} restored = ${b1.frames} frames)`);
  } finally { await e.close(); }
}

const t0 = Date.now();
const phase = process.argv[2];
(phase === 'boot1' ? boot1() : phase === 'boot2' ? boot2() : Promise.reject(new Error('usage: cache-reboot.ts boot1|boot2')))
  .catch((err) => check(false, `${phase}: ${(err as Error).stack ?? err}`))
  .finally(() => finish(`cache-reboot ${phase}`, t0));
