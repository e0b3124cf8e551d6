// Runs INSIDE the kernel test VM, twice over one virtio disk, with a power
// cut between the runs (driven by test/vm/reboot.sh): a durable device keeps
// every write that was acknowledged and flushed when the machine loses power
// in the middle of a snapshot. A process kill (the crash harness, test/crash)
// keeps the page cache; only a power cut shows a missing fsync.
//
//   boot 1 (POINT is a crash point of src/crash-point.ts):
//     ext4 on the disk holds a local-directory store and the engine's cache
//     directory (the device's overlays and manifest). A durable device on an
//     imported template takes a seeded stream of writes, zeroes, trims and
//     FUA writes, then a flush; then a snapshot:
//       freeze.saved    power cut right after the manifest names the frozen
//                       overlay and the new current one (C4: the new files
//                       must be whole on disk before the manifest names them)
//       upload.rebased  the upload is held while a second stream (flushed)
//                       lands in the new overlay; the power is cut right
//                       after the manifest names the uploaded layer
//       fold.saved      as upload.rebased, but the upload fails: fold-back
//                       copies the frozen overlay's blocks under the second
//                       stream's, and the power is cut right after the
//                       manifest stops naming the frozen overlay (C3: the
//                       copies must be on disk before that)
//     What the device must hold is written to the disk (fsynced) first.
//   boot 2: the device resumes; every block reads as flushed; a new snapshot
//     of it reads the same.
import * as fs from 'fs';
import { Engine, type Device } from '../../src/index';
import { heldStore, makeImage } from '../helpers/util';
import { Model, deviceTarget, drive, opStream } from '../crash/model';
import { check, sh, finish } from './ublk-helpers';

const DISK = process.env.STRATA_REBOOT_DISK ?? '/dev/vda';
const MNT = '/tmp/strata-power';
// The file system under the device's files, and how each makes one.
const MKFS = { ext4: 'mkfs.ext4 -q -F', btrfs: 'modprobe btrfs && mkfs.btrfs -q -f' } as const;
type Fs = keyof typeof MKFS;
const B = 4096;
const TEMPLATE = makeImage(4096, 5150); // 16 MiB
const SEED = 20261207;
const POINTS = ['freeze.saved', 'upload.rebased', 'fold.saved'] as const;
type Point = typeof POINTS[number];

/** One seeded stream of writes, zeroes and trims (no snapshots), then a flush; the model follows every ack. */
async function stream(dev: Device, model: Model, epoch: number, count: number): Promise<number> {
  const ops = opStream(SEED, epoch, dev.blocks, count).filter((op) => op.kind !== 'snapshot');
  model.beginEpoch(epoch);
  await drive(deviceTarget(dev), SEED, epoch, ops, 8, { start: (op) => model.start(op), ack: (op) => model.ack(op) });
  await dev.flush();
  return ops.length;
}

function writeDurably(file: string, data: Uint8Array): void {
  const fd = fs.openSync(file, 'w');
  try { fs.writeFileSync(fd, data); fs.fsyncSync(fd); } finally { fs.closeSync(fd); }
  const dfd = fs.openSync(MNT, 'r');
  try { fs.fsyncSync(dfd); } finally { fs.closeSync(dfd); }
}

async function boot1(point: Point, fsType: Fs): Promise<void> {
  await sh(`${MKFS[fsType]} ${DISK} && mkdir -p ${MNT} && mount ${DISK} ${MNT}`);
  fs.writeFileSync('/tmp/power.img', TEMPLATE);
  const imp = await Engine.open({ store: `${MNT}/store`, cacheDir: '/tmp/power-import' });
  const { id } = await imp.importImage('/tmp/power.img');
  await imp.close();
  await sh('sync');

  const { store, release } = heldStore(`${MNT}/store`, point === 'fold.saved');
  const e = await Engine.open({ store, cacheDir: `${MNT}/data`, profiles: false });
  const dev = await e.openDevice(id, { id: 'pc', durable: true });
  writeDurably(`${MNT}/template-id`, Buffer.from(id));
  const model = new Model(TEMPLATE, SEED, true);
  const n1 = await stream(dev, model, 1, 300);
  console.log(`     boot 1: ${n1} operations acknowledged and flushed`);
  let done: Promise<unknown>;
  if (point === 'freeze.saved') {
    writeDurably(`${MNT}/expect.img`, model.img);
    process.env.STRATA_CRASH_AT = `${point}:1:power`;
    console.log(`BOOT1-DONE cutting the power at ${point}`);
    done = dev.snapshot();
  } else {
    let frozen!: () => void;
    const isFrozen = new Promise<void>((r) => { frozen = r; });
    done = dev.snapshot({ onFrozen: frozen }).catch((err: Error) => err);
    await isFrozen;
    const n2 = await stream(dev, model, 2, 150);
    console.log(`     boot 1: the snapshot froze; ${n2} more operations acknowledged and flushed while its upload is held`);
    writeDurably(`${MNT}/expect.img`, model.img);
    process.env.STRATA_CRASH_AT = `${point}:1:power`;
    console.log(`BOOT1-DONE the upload goes on ${point === 'fold.saved' ? 'and fails' : ''}; cutting the power at ${point}`);
    release();
  }
  await Promise.race([done, new Promise((r) => setTimeout(r, 120_000))]);
  await new Promise((r) => setTimeout(r, 10_000));
  check(false, `boot 1: the power cut at ${point} did not happen`);
}

async function boot2(point: Point, fsType: Fs): Promise<void> {
  // As a host's boot does: the file system checked (and repaired) before it is mounted.
  if (fsType === 'ext4') {
    const fsck = await sh(`e2fsck -fy ${DISK} 2>&1; r=$?; [ $r -le 2 ] || echo "e2fsck exit $r"`);
    console.log(`     boot 2: e2fsck: ${fsck.trim().split('\n').slice(-1)[0]}`);
    check(!/e2fsck exit/.test(fsck), 'boot 2: e2fsck leaves the file system consistent');
  } else {
    await sh('modprobe btrfs'); // btrfs replays its log at mount
  }
  await sh(`mkdir -p ${MNT} && mount ${DISK} ${MNT}`);
  const want = fs.readFileSync(`${MNT}/expect.img`);
  const e = await Engine.open({ store: `${MNT}/store`, cacheDir: `${MNT}/data`, profiles: false });
  try {
    check(e.savedDevices().includes('pc'), 'boot 2: the durable device is listed');
    const dev = await e.resumeDevice('pc');
    const template = fs.readFileSync(`${MNT}/template-id`, 'utf8');
    check((dev.layerId !== template) === (point === 'upload.rebased'), `boot 2: the device resumed on ${dev.layerId === template ? 'the template' : 'the uploaded layer'}`);
    const have = await dev.read(0, dev.size);
    const bad: string[] = [];
    let wrong = 0, old = 0;
    for (let b = 0; b < want.length / B; b++) {
      const blk = have.subarray(b * B, (b + 1) * B);
      if (blk.equals(want.subarray(b * B, (b + 1) * B))) continue;
      const isOld = blk.equals(TEMPLATE.subarray(b * B, (b + 1) * B));
      wrong++;
      if (isOld) old++;
      if (bad.length < 8) bad.push(`${b}${isOld ? ' (template data)' : blk.every((x) => x === 0) ? ' (zeros)' : ''}`);
    }
    check(wrong === 0, `boot 2 after a power cut at ${point}: every acknowledged and flushed block reads back` +
      (wrong ? ` (${wrong} wrong, ${old} of them template data: ${bad.join(', ')}${wrong > bad.length ? ', …' : ''})` : ''));
    const snap = await dev.snapshot();
    const copy = await e.openDevice(snap.id);
    check((await copy.read(0, copy.size)).equals(want), `boot 2: a new snapshot of the resumed device (${snap.id.slice(0, 12)}) reads the same`);
    await e.closeDevice(copy);
  } finally { await e.close(); }
}

const t0 = Date.now();
const [phase, point, fsType = 'ext4'] = process.argv.slice(2) as [string, Point, Fs?];
const usage = `usage: power-cut.ts boot1|boot2 ${POINTS.join('|')} [${Object.keys(MKFS).join('|')}]`;
(!POINTS.includes(point) || !(fsType in MKFS) ? Promise.reject(new Error(usage))
  : phase === 'boot1' ? boot1(point, fsType) : phase === 'boot2' ? boot2(point, fsType) : Promise.reject(new Error(usage)))
  .catch((err) => check(false, `${phase}: ${(err as Error).stack ?? err}`))
  .finally(() => finish(`power-cut ${phase} ${point} on ${fsType}`, t0));
