// Runs INSIDE the kernel test VM: the daemon (`node src/server.js`) with
// ublk available. Through the HTTP API: import a template, create a device
// with frontend "auto" (which must be ublk here), mkfs + mount + files on its
// /dev/ublkbN, snapshot, resume the snapshot on a second ublk device and
// compare every file; then SIGTERM (ublk devices kept recoverable), start
// the daemon again and find the first device at the same /dev path with its
// data, recovered; then SIGKILL during a fio verify run on it, with two more devices
// made unrecoverable (a corrupt manifest, a missing one) and a quiesced
// device of another owner beside them: the next daemon recovers the first
// (fio completes with no verify error), removes the two it cannot take back
// and leaves the other owner's alone; finally delete devices through the API.
import * as fs from 'fs';
import * as http from 'http';
import * as path from 'path';
import { spawn, type ChildProcess } from 'child_process';
import { check, sh, ublkOrSkip, finish, waitFor, startFioVerify, scratchFile, startServer, serveUntilKilled } from './ublk-helpers';
import { kernelDevices, kernelDeviceInfo, ownerId, removeKernelDevice, UblkDevice, FileTarget } from '../../src/ublk';

const DIR = '/tmp/strata-vm-daemon-ublk';
const SERVER = path.join(__dirname, '..', '..', 'src', 'server.js');
const sock = `${DIR}/data/api.sock`;

function api(method: string, p: string, body?: unknown): Promise<{ status: number; json: any }> {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? undefined : JSON.stringify(body);
    const req = http.request({ socketPath: sock, method, path: p, headers: data ? { 'content-type': 'application/json' } : {} }, (res) => {
      let t = '';
      res.on('data', (c) => { t += c; });
      res.on('end', () => { let json: any; try { json = JSON.parse(t); } catch { json = t; } resolve({ status: res.statusCode!, json }); });
    });
    req.on('error', reject);
    if (data) req.write(data);
    req.end();
  });
}

function start(): { child: ChildProcess; out: () => string; exited: Promise<number | null> } {
  const child = spawn(process.execPath, [SERVER, '--data', `${DIR}/data`], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.on('data', (d) => { out += d; });
  child.stderr!.on('data', (d) => { out += d; });
  return { child, out: () => out, exited: new Promise((r) => child.on('exit', (c) => r(c))) };
}

async function started(d: ReturnType<typeof start>): Promise<boolean> {
  const t = Date.now();
  while (!/"msg":"strata daemon started"/.test(d.out()) && Date.now() - t < 180_000 && d.child.exitCode === null) await new Promise((r) => setTimeout(r, 100));
  return /"msg":"strata daemon started"/.test(d.out());
}

async function op(id: string): Promise<any> {
  for (;;) {
    const r = await api('GET', `/v1/operations/${id}`);
    if (r.json.state !== 'running') return r.json;
    await new Promise((res) => setTimeout(res, 200));
  }
}

const sums = async (mnt: string) => (await sh(`cd ${mnt} && find . -type f ! -path './lost+found/*' | sort | xargs sha256sum`)).trim();

if (process.argv[2] === '--serve') {
  serveUntilKilled(() => UblkDevice.create({ target: FileTarget.open(process.argv[3]), recovery: true, owner: ownerId('/elsewhere/cache'), depth: 4 }));
} else (async () => {
  const t0 = Date.now();
  if (!ublkOrSkip()) finish('daemon-ublk', t0);
  fs.rmSync(DIR, { recursive: true, force: true });
  fs.mkdirSync(`${DIR}/mnt`, { recursive: true });
  await sh(`truncate -s 64M ${DIR}/blank.img`);
  let d = start();
  const mnt = `${DIR}/mnt`;
  try {
    if (!check(await started(d), `daemon started: ${d.out().split('\n').find((l) => l.includes('daemon started')) ?? d.out().slice(-400)}`)) finish('daemon-ublk', t0);
    check(/"ublk":"available/.test(d.out()), 'the daemon found ublk usable');
    const imp = await op((await api('POST', '/v1/templates', { path: `${DIR}/blank.img` })).json.id);
    check(imp.state === 'succeeded', `template imported (${imp.state})`);
    const tpl = imp.result.template.id;
    const a = await api('POST', '/v1/devices', { layer: tpl, id: 'vm1' });
    check(a.status === 201 && a.json.frontend === 'ublk' && /^\/dev\/ublkb\d+$/.test(a.json.path), `frontend auto is ublk: ${JSON.stringify(a.json.path)}`);
    const dev = a.json.path as string;
    await sh(`timeout 120 mkfs.ext4 -q -F ${dev}`, 150_000);
    check(true, 'mkfs.ext4 on the ublk device');
    await sh(`mount ${dev} ${mnt} && mkdir ${mnt}/d && for i in 1 2 3 4; do head -c $((200000 * i)) /dev/urandom > ${mnt}/d/f$i; done && sync`, 150_000);
    const before = await sums(mnt);
    await sh(`umount ${mnt}`);
    const snap = await op((await api('POST', '/v1/devices/vm1/snapshots')).json.id);
    check(snap.state === 'succeeded', `snapshot through the API (${snap.state})`);
    const b = await api('POST', '/v1/devices', { layer: snap.result.snapshot.id, id: 'vm2', frontend: 'ublk' });
    check(b.status === 201, `resumed the snapshot on ${b.json.path}`);
    await sh(`mount -o ro ${b.json.path} ${mnt}`);
    check((await sums(mnt)) === before, 'every file matches on the resumed device');
    await sh(`umount ${mnt}`);

    // Restart: devices come back, ublk devices recovered at the same path.
    await sh(`head -c 1048576 /dev/urandom > ${DIR}/tail.bin && dd if=${DIR}/tail.bin of=${dev} bs=1M seek=60 oflag=direct status=none`);
    d.child.kill('SIGTERM');
    check((await d.exited) === 0, 'SIGTERM: the daemon stopped cleanly');
    check(fs.existsSync(dev), `${dev} was left for recovery`);
    d = start();
    check(await started(d), 'daemon started again');
    check(/"msg":"devices resumed"/.test(d.out()), 'it resumed its devices');
    const again = await api('GET', '/v1/devices/vm1');
    check(again.json.path === dev, `vm1 recovered at the same path (${again.json.path})`);
    check(kernelDevices().length === 2, `no stray kernel devices (${kernelDevices().join(',')})`);
    const cur = again.json.path as string;
    const tail = await sh(`dd if=${cur} bs=1M skip=60 count=1 iflag=direct status=none | cmp - ${DIR}/tail.bin && echo same`).catch((e) => (e as Error).message);
    check(tail.trim() === 'same', 'a raw write made just before the stop is there');
    await sh(`mount ${cur} ${mnt}`);
    check((await sums(mnt)) === before, 'and the filesystem with every file');
    await sh(`umount ${mnt}`);

    // kill -9 mid-write, with leftovers the next daemon cannot take back.
    const c = await api('POST', '/v1/devices', { layer: tpl, id: 'vm3', frontend: 'ublk' });
    const e = await api('POST', '/v1/devices', { layer: tpl, id: 'vm4', frontend: 'ublk' });
    check(c.status === 201 && e.status === 201, `two more devices: ${c.json.path} ${e.json.path}`);
    scratchFile(`${DIR}/other.img`, 4 << 20);
    // Quiesced, as another data directory's dead daemon would leave it: its server process is killed.
    const srv = await startServer(__filename, [`${DIR}/other.img`]);
    const other = { id: srv.id, path: `/dev/ublkb${srv.id}` };
    srv.child.kill('SIGKILL');
    check(await waitFor(() => kernelDeviceInfo(other.id)?.state === 'quiesced', 10_000), `another owner's device ${other.path} is quiesced`);
    const writes = async () => Number((await api('GET', '/v1/devices/vm1')).json.stats?.native?.fastWrites ?? 0);
    const w0 = await writes();
    const fio = startFioVerify(cur, 32);
    for (const end = Date.now() + 60_000; Date.now() < end && !fio.exited() && (await writes()) < w0 + 500;) await new Promise((r) => setTimeout(r, 50));
    d.child.kill('SIGKILL');
    await d.exited;
    check(!fio.exited(), 'daemon killed with SIGKILL during a fio verify run on vm1');
    const devDir = `${DIR}/data/cache/devices`;
    fs.writeFileSync(`${devDir}/vm3.json`, '{ not json');
    fs.renameSync(`${devDir}/vm4.json`, `${devDir}/vm4.json.gone`);
    d = start();
    check(await started(d), 'daemon started after the SIGKILL');
    const logs = d.out();
    check(logs.split('\n').some((l) => l.includes('"device":"vm3"') && l.includes('"msg":"cannot resume device (left on disk)"')), 'vm3 (corrupt manifest) reported as not resumable');
    const removed = [...logs.matchAll(/"ublk":"(\/dev\/ublkb\d+)"[^\n]*"msg":"removed a kernel ublk device left by a dead process"/g)].map((m) => m[1]).sort();
    check(JSON.stringify(removed) === JSON.stringify([c.json.path, e.json.path].sort()), `the kernel devices of vm3 and vm4 were removed (${removed.join(' ') || 'none'})`);
    check(!fs.existsSync(c.json.path) && !fs.existsSync(e.json.path), 'and are gone from /dev');
    check(kernelDeviceInfo(other.id)?.state === 'quiesced', `the other owner's ${other.path} was left alone`);
    const code = await Promise.race([fio.done, new Promise<number>((r) => setTimeout(() => r(-2), 300_000))]);
    if (!check(fio.clean(code), `fio completed after the new daemon recovered vm1, with no verify error (exit ${code})`)) console.log(fio.out().slice(-1500));
    check((await api('GET', '/v1/devices/vm1')).json.path === cur, `vm1 recovered at ${cur}`);
    await removeKernelDevice(other.id);
    check(await waitFor(() => kernelDeviceInfo(other.id) === null, 10_000), `removeKernelDevice removed the quiesced ${other.path}`);
    check((await api('DELETE', '/v1/devices/vm1')).status === 204, 'DELETE vm1');
    check((await api('DELETE', '/v1/devices/vm2')).status === 204, 'DELETE vm2');
    check(await waitFor(() => kernelDevices().length === 0, 10_000), `kernel devices removed (${kernelDevices().join(',') || 'none'})`);
  } catch (e) {
    check(false, (e as Error).message);
    console.log(d.out().slice(-2000));
    await sh(`umount ${mnt}`).catch(() => undefined);
  } finally {
    d.child.kill('SIGTERM');
    await d.exited;
  }
  finish('daemon-ublk', t0);
})().catch((e) => { console.error(e); process.exit(1); });
