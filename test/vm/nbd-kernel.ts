// Runs INSIDE the kernel test VM (npm run test:vm): the Linux nbd driver on
// a strata device. mkfs.ext4, mount, write a file tree, unmount, snapshot,
// resume the snapshot on a new device attached as another /dev/nbdN, fsck,
// mount and check every file's sha256.
import * as fs from 'fs';
import { execFile } from 'child_process';
import { Engine } from '../../src/index';
import { NbdServer } from '../../src/nbd/server';
import { ExportMap } from '../../src/nbd/export';
import { deviceExport } from '../../src/nbd-export';

let passed = 0, failed = 0;
function check(ok: boolean, what: string): void {
  if (ok) { passed++; console.log(`ok   ${what}`); } else { failed++; console.log(`FAIL ${what}`); }
}
const sh = (cmd: string, args: string[]) => new Promise<string>((res, rej) =>
  execFile(cmd, args, { timeout: 300_000, maxBuffer: 1 << 24 }, (e, out, err) => (e ? rej(new Error(`${cmd} ${args.join(' ')}: ${err || e.message}`)) : res(out))));

async function attach(sock: string, name: string, dev: string): Promise<void> {
  await sh('nbd-client', ['-N', name, '-u', sock, dev, '-b', '4096']);
}
async function detach(dev: string): Promise<void> { await sh('nbd-client', ['-d', dev]); }

(async () => {
  const t0 = Date.now();
  const dir = '/tmp/strata-vm-nbd';
  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(dir, { recursive: true });
  const size = Number(process.env.STRATA_VM_DISK_MB ?? 128) * 1024 * 1024;
  fs.writeFileSync(`${dir}/empty.img`, Buffer.alloc(0));
  fs.truncateSync(`${dir}/empty.img`, size);
  const engine = await Engine.open({ store: `${dir}/store`, workers: 1, arenaBytes: 32 << 20 });
  const exports = new ExportMap();
  const server = new NbdServer({ exports, log: (m) => console.log(m) });
  const sock = await server.listenUnix(`${dir}/nbd.sock`);
  try {
    const base = await engine.importImage(`${dir}/empty.img`);
    const a = await engine.openDevice(base.id);
    exports.set('a', deviceExport(a));
    await attach(sock, 'a', '/dev/nbd0');
    check(fs.readFileSync('/sys/block/nbd0/size', 'utf8').trim() === String(size / 512), 'nbd0 attached with the export size');
    await sh('mkfs.ext4', ['-q', '-F', '/dev/nbd0']);
    fs.mkdirSync('/mnt/a', { recursive: true });
    await sh('mount', ['/dev/nbd0', '/mnt/a']);
    // Everything that touches the mounted filesystem runs in child
    // processes: this process serves the device, and a synchronous file
    // call here would wait on I/O only this process can answer.
    await sh('sh', ['-c', `set -e; cd /mnt/a; for i in $(seq 0 23); do mkdir -p d$((i % 4)); head -c $((1 + (i * 7919) % 3145728)) /dev/urandom > d$((i % 4))/f$i; done; : > empty; sha256sum d*/f* empty > ${dir}/sums; sync`]);
    const nfiles = (await sh('wc', ['-l', `${dir}/sums`])).trim().split(' ')[0];
    await sh('umount', ['/mnt/a']);
    await detach('/dev/nbd0');
    await a.flush();
    const snap = await a.snapshot();
    check(/^[0-9a-f]{32}$/.test(snap.id), `snapshot ${snap.id}: ${snap.stats.storedBlocks} blocks stored, ${snap.stats.zeroBlocks} zero`);

    const b = await engine.openDevice(snap.id);
    exports.set('b', deviceExport(b));
    await attach(sock, 'b', '/dev/nbd1');
    const fsck = await sh('fsck.ext4', ['-n', '-f', '/dev/nbd1']).then(() => true, (e) => { console.log(e.message); return false; });
    check(fsck, 'fsck.ext4 -n on the resumed snapshot is clean');
    fs.mkdirSync('/mnt/b', { recursive: true });
    await sh('mount', ['-o', 'ro', '/dev/nbd1', '/mnt/b']);
    const verified = await sh('sh', ['-c', `cd /mnt/b && sha256sum -c ${dir}/sums | grep -c ': OK$'`]).catch((e) => e.message);
    check(verified.trim() === nfiles && Number(nfiles) === 25, `every file's sha256 matches after resume (${verified.trim()}/${nfiles})`);
    await sh('umount', ['/mnt/b']);
    await detach('/dev/nbd1');
  } catch (e) {
    check(false, `kernel nbd flow: ${(e as Error).message}`);
  } finally {
    await server.close(2000);
    await engine.close();
  }
  console.log(`nbd-kernel on ${fs.readFileSync('/proc/sys/kernel/osrelease', 'utf8').trim()}: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
})();
