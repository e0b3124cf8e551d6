// Runs INSIDE the kernel test VM (npm run test:vm): snapshots of a live ext4
// filesystem on a strata device, through the kernel nbd driver and through
// ublk. A writer keeps creating files, each fsynced (dd conv=fsync) and then
// logged. Two snapshots are taken while it runs:
//   (a) after `fsfreeze -f`, thawed as soon as the snapshot point is taken
//       (onFrozen), so the writer pauses for the freeze only; fsck -n of it
//       must be clean as it is;
//   (b) with no freeze at all (crash-consistent): fsck -n must be clean once
//       a mount has replayed the journal.
// Each snapshot is opened as a new device on the same frontend; every file
// the writer had logged before the snapshot call must be there, whole.
import * as fs from 'fs';
import { spawn } from 'child_process';
import { Engine, type Device } from '../../src/index';
import { NbdServer } from '../../src/nbd/server';
import { ExportMap } from '../../src/nbd/export';
import { deviceExport } from '../../src/nbd-export';
import { serveUblk } from '../../src/ublk-export';
import { check, sh, skip, finish, transports, ublkOrSkip } from './ublk-helpers';

const DIR = '/tmp/strata-vm-live';
const MB = Number(process.env.STRATA_VM_DISK_MB ?? 64);
const FILE = 32 * 1024;

/** A kernel block device for a strata device, and how to let go of it. */
interface Attached { path: string; detach(): Promise<void> }
type Frontend = { name: string; attach(dev: Device, slot: number): Promise<Attached> };

async function main(): Promise<void> {
  const t0 = Date.now();
  fs.rmSync(DIR, { recursive: true, force: true });
  fs.mkdirSync(DIR, { recursive: true });
  fs.writeFileSync(`${DIR}/empty.img`, Buffer.alloc(0));
  fs.truncateSync(`${DIR}/empty.img`, MB << 20);
  const engine = await Engine.open({ store: `${DIR}/store`, workers: 1, arenaBytes: 32 << 20 });
  const exports = new ExportMap();
  const server = new NbdServer({ exports, log: (m) => console.log(m) });
  const sock = await server.listenUnix(`${DIR}/nbd.sock`);
  const frontends: Frontend[] = [{
    name: 'nbd',
    attach: async (dev, slot) => {
      exports.set(`d${slot}`, deviceExport(dev));
      await sh(`nbd-client -N d${slot} -u ${sock} /dev/nbd${slot} -b 4096`);
      return { path: `/dev/nbd${slot}`, detach: async () => { await sh(`nbd-client -d /dev/nbd${slot}`); exports.delete(`d${slot}`); } };
    },
  }];
  const f = ublkOrSkip();
  if (f) {
    const transport = transports(f)[0];
    frontends.push({
      name: `ublk ${transport}`,
      attach: async (dev) => { const u = await serveUblk(dev, { transport, queues: 1 }); return { path: u.path, detach: () => u.delete() }; },
    });
  }
  try {
    const template = (await engine.importImage(`${DIR}/empty.img`)).id;
    for (const fe of frontends) await liveSnapshots(engine, template, fe);
  } finally {
    await server.close(2000);
    await engine.close();
  }
  finish('live-snapshot', t0);
}

async function liveSnapshots(engine: Engine, template: string, fe: Frontend): Promise<void> {
  const mnt = `${DIR}/mnt`, log = `${DIR}/fsynced-${fe.name.replace(/\W/g, '')}`;
  fs.mkdirSync(mnt, { recursive: true });
  fs.writeFileSync(log, '');
  const dev = await engine.openDevice(template);
  let a: Attached | undefined;
  let writer: ReturnType<typeof spawn> | undefined;
  try {
    a = await fe.attach(dev, 0);
    await sh(`mkfs.ext4 -q -F ${a.path} && mount ${a.path} ${mnt} && mkdir ${mnt}/w`);
    // Each file's bytes follow from its name; logged only once dd's fsync returned.
    writer = spawn('sh', ['-c', `i=0; while :; do n=f$i; yes $n | head -c ${FILE} | dd of=${mnt}/w/$n bs=${FILE} conv=fsync status=none 2>/dev/null && echo $n >> ${log}; i=$((i+1)); done`], { stdio: 'ignore', detached: true });
    const logged = () => fs.readFileSync(log, 'utf8').split('\n').filter(Boolean);
    await waitLines(logged, 5);

    // (a) frozen: the point is taken inside the freeze; thawed right after.
    const beforeA = logged();
    const ts = Date.now();
    await sh('fsfreeze -V');
    const spawnMs = Date.now() - ts; // what starting fsfreeze alone costs here
    const tf = Date.now();
    await sh(`fsfreeze -f ${mnt}`);
    const frozenAt = Date.now();
    let pointAt = 0;
    let thawed: Promise<number> | null = null;
    const thaw = () => (thawed ??= sh(`fsfreeze -u ${mnt}`).then(() => Date.now()));
    const snapA = await dev.snapshot({ onFrozen: () => { pointAt = Date.now(); void thaw(); } }).finally(thaw);
    const thawedAt = await thawed!;
    console.log(`${fe.name}: write pause of the frozen snapshot ${thawedAt - tf} ms = fsfreeze -f ${frozenAt - tf} ms + snapshot point ${pointAt - frozenAt} ms` +
      ` (${snapA.frozenMs.toFixed(1)} ms inside the engine) + fsfreeze -u ${thawedAt - pointAt} ms; starting fsfreeze alone takes ${spawnMs} ms here (TCG)`);
    await waitLines(logged, beforeA.length + 3);

    // (b) no freeze: crash-consistent.
    const beforeB = logged();
    const snapB = await dev.snapshot();
    await waitLines(logged, beforeB.length + 2);
    await stopWriter(writer); writer = undefined;
    await sh(`umount ${mnt}`);
    await a.detach(); a = undefined;

    await checkSnapshot(engine, fe, snapA.id, beforeA, false, `${fe.name} (a) frozen`);
    await checkSnapshot(engine, fe, snapB.id, beforeB, true, `${fe.name} (b) not frozen`);
  } catch (e) {
    check(false, `${fe.name}: ${(e as Error).message}`);
    await sh(`umount ${mnt}`).catch(() => undefined);
  } finally {
    if (writer) await stopWriter(writer);
    await a?.detach().catch(() => undefined);
    await engine.closeDevice(dev);
  }
}

async function checkSnapshot(engine: Engine, fe: Frontend, layer: string, names: string[], replay: boolean, what: string): Promise<void> {
  const mnt = `${DIR}/mnt-check`;
  fs.mkdirSync(mnt, { recursive: true });
  const dev = await engine.openDevice(layer);
  const a = await fe.attach(dev, 1);
  try {
    const fsck = () => sh(`fsck.ext4 -fn ${a.path} >${DIR}/fsck.out 2>&1 && echo clean || echo dirty`).then((s) => s.trim());
    if (replay) {
      // A crash-consistent image may need its journal replayed: a mount does that.
      await sh(`mount ${a.path} ${mnt} && umount ${mnt}`);
    }
    const state = await fsck();
    check(state === 'clean', `${what}: fsck -n ${replay ? 'after the journal replay of a mount ' : ''}is clean${state === 'clean' ? '' : `: ${fs.readFileSync(`${DIR}/fsck.out`, 'utf8').slice(-800)}`}`);
    await sh(`mount -o ro ${a.path} ${mnt}`);
    const bad = (await sh(`cd ${mnt}/w && for n in ${names.join(' ')}; do yes $n | head -c ${FILE} | cmp -s - $n || echo $n; done`)).trim();
    check(bad === '' && names.length > 0, `${what}: all ${names.length} files fsynced before the snapshot call are there, whole${bad ? ` (missing or wrong: ${bad.split('\n').slice(0, 5).join(' ')})` : ''}`);
    await sh(`umount ${mnt}`);
  } finally {
    await sh(`umount ${mnt}`).catch(() => undefined);
    await a.detach();
    await engine.closeDevice(dev);
  }
}

// The writer's dd holds a file on the mount after its sh is gone (a umount then
// says "target is busy"): kill the whole process group and wait for it to empty.
async function stopWriter(writer: ReturnType<typeof spawn>): Promise<void> {
  const pgid = writer.pid!;
  try { process.kill(-pgid, 'SIGKILL'); } catch { /* already gone */ }
  const end = Date.now() + 30_000;
  for (;;) {
    if (!groupAlive(pgid)) return;
    if (Date.now() > end) throw new Error(`the writer's process group ${pgid} outlived SIGKILL by 30 s`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

// A member that is not a zombie (a reparented zombie may wait long for its reaper).
function groupAlive(pgid: number): boolean {
  for (const pid of fs.readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
    let stat: string;
    try { stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8'); } catch { continue; }
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // state ppid pgrp ...
    if (Number(f[2]) === pgid && f[0] !== 'Z') return true;
  }
  return false;
}

async function waitLines(lines: () => string[], n: number): Promise<void> {
  const end = Date.now() + 120_000;
  while (lines().length < n) {
    if (Date.now() > end) throw new Error(`the writer logged only ${lines().length} of ${n} files in 120 s`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

main().catch((e) => { check(false, `live-snapshot: ${(e as Error).stack}`); skip('aborted'); finish('live-snapshot', Date.now()); });
