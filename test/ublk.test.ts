// Host-side checks of the ublk frontend. The kernel paths (real devices)
// run in the VM lane (test/vm/ublk-*.ts, `npm run test:vm`); here we check
// what holds without ublk_drv: typed errors, option validation, FileTarget,
// and that a failed create() leaves nothing holding the process open.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';
import { features, UblkDevice, FileTarget, UblkError, transportFromEnv, ownerId, kernelDeviceInfo, sweepLeftDevices } from '../src/ublk';
import { StrataError } from '../src/errors';
import { fdsOn } from './helpers/util';
import { MessageChannel } from 'worker_threads';
import { loadNative, OP } from '../src/native';
import { IoLoop, type Channel } from '../src/io/loop';
import { ublkAddon } from '../src/ublk/native';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'strata-ublk-'));
const img = path.join(dir, 'img');
fs.writeFileSync(img, Buffer.alloc(0));
fs.truncateSync(img, (8 << 20) + 100);
const hasUblk = fs.existsSync('/dev/ublk-control');
if (!hasUblk) console.log('SKIP: kernel ublk tests: no /dev/ublk-control on this host (ublk_drv); they run in `npm run test:vm`');

test('features(): typed result, or a typed ENOENT when ublk_drv is absent', () => {
  if (hasUblk) {
    const f = features();
    assert.type(f.flags, 'number');
    assert.ok(Array.isArray(f.names));
    return;
  }
  try {
    features();
    assert.unreachable('features() should throw without /dev/ublk-control');
  } catch (e) {
    assert.instance(e, UblkError);
    assert.instance(e, StrataError);
    const u = e as UblkError;
    assert.is(u.code, 'ENOENT');
    assert.is(u.errno, os.constants.errno.ENOENT);
    assert.match(u.message, /ublk-control/);
  }
});

test('transportFromEnv: empty means auto, bad values are EINVAL', () => {
  const saved = process.env.STRATA_UBLK_TRANSPORT;
  try {
    process.env.STRATA_UBLK_TRANSPORT = '';
    assert.is(transportFromEnv(), 'auto');
    process.env.STRATA_UBLK_TRANSPORT = 'zero-copy';
    assert.is(transportFromEnv(), 'zero-copy');
    process.env.STRATA_UBLK_TRANSPORT = 'user-copy';
    assert.is(transportFromEnv(), 'user-copy');
    process.env.STRATA_UBLK_TRANSPORT = 'zerocopy';
    assert.throws(() => transportFromEnv(), (e: unknown) => e instanceof UblkError && e.code === 'EINVAL');
  } finally {
    if (saved === undefined) delete process.env.STRATA_UBLK_TRANSPORT; else process.env.STRATA_UBLK_TRANSPORT = saved;
  }
});

test('FileTarget: size rounded to sectors', () => {
  const t = FileTarget.open(img);
  assert.is(t.size, 8 << 20);
  t.close();
  const u = FileTarget.open(img, { size: 4096 });
  assert.is(u.size, 4096);
  u.close();
});

test('FileTarget.close() closes its file; a closed target serves no new device', async () => {
  const open = () => fdsOn(img);
  const before = open();
  const t = FileTarget.open(img);
  assert.is(open(), before + 1);
  t.close();
  assert.is(open(), before, 'closed by close()');
  const e = await UblkDevice.create({ target: t }).then(() => null, (x) => x);
  assert.instance(e, UblkError);
  assert.is((e as UblkError).sysCode, 'EBADF');
});

test('FileTarget.serveSlow answers reads, writes and zeroing with fs calls', async () => {
  const t = FileTarget.open(img);
  const data = Buffer.alloc(4096, 0x5a);
  await t.serveSlow({ op: 'write', opcode: 1, offset: 8192, length: 4096, fua: true, queue: 0, tag: 0, data });
  const back = await t.serveSlow({ op: 'read', opcode: 0, offset: 8192, length: 4096, fua: false, queue: 0, tag: 0 });
  assert.ok(data.equals(back as Buffer));
  await t.serveSlow({ op: 'write-zeroes', opcode: 5, offset: 8192, length: 4096, fua: false, queue: 0, tag: 0 });
  assert.ok((fs.readFileSync(img).subarray(8192, 12288)).equals(Buffer.alloc(4096)));
  await t.serveSlow({ op: 'flush', opcode: 2, offset: 0, length: 0, fua: false, queue: 0, tag: 0 });
  t.close();
});

test('UblkDevice.create validates options before touching the kernel', async () => {
  const t = FileTarget.open(img);
  for (const bad of [{ transport: 'fast' }, { depth: 0 }, { maxIo: 1000 }, { size: 1000 }, { recovery: 'sometimes' }, { owner: -1 }, { owner: 2 ** 32 }, { requestTimeoutMs: -1 }, { requestTimeoutMs: 1.5 }]) {
    const e = await UblkDevice.create({ target: t, ...(bad as object) }).then(() => null, (x) => x);
    assert.instance(e, UblkError, JSON.stringify(bad));
    assert.is((e as UblkError).code, 'EINVAL', JSON.stringify(bad));
  }
  const e = await UblkDevice.create({ target: { fd: 42 } as never }).then(() => null, (x) => x);
  assert.instance(e, UblkError, 'not a FileTarget');
  assert.is((e as UblkError).code, 'EINVAL');
  t.close();
});

test('ownerId: one 32-bit id per real directory (symlinks resolve to the same)', () => {
  const a = path.join(dir, 'owner-a'), b = path.join(dir, 'owner-b'), link = path.join(dir, 'owner-link');
  fs.mkdirSync(a); fs.mkdirSync(b); fs.symlinkSync(a, link);
  assert.is(ownerId(a), ownerId(link));
  assert.is(ownerId(a), ownerId(a + '/'));
  assert.is.not(ownerId(a), ownerId(b));
  for (const id of [ownerId(a), ownerId(b)]) assert.ok(Number.isInteger(id) && id >= 0 && id < 2 ** 32, String(id));
});

test('kernelDeviceInfo: null for a device that does not exist; without ublk_drv a typed ENOENT and nothing to sweep', async () => {
  if (hasUblk) { assert.is(kernelDeviceInfo(0x7ffffff0), null); return; } // sweeps: VM lane (test/vm/daemon-ublk.ts)
  const e = (() => { try { kernelDeviceInfo(0); return null; } catch (x) { return x; } })();
  assert.instance(e, UblkError);
  assert.is((e as UblkError).code, 'ENOENT');
  assert.equal(await sweepLeftDevices(ownerId(dir), new Set()), []);
});

test('a create() that fails leaves nothing holding the process (exits promptly)', () => {
  if (hasUblk) return;
  const code = `
    const { UblkDevice, FileTarget } = require(${JSON.stringify(path.join(__dirname, '..', 'src', 'ublk'))});
    UblkDevice.create({ target: FileTarget.open(${JSON.stringify(img)}) }).then(
      () => { console.log('created?'); process.exit(3); },
      (e) => console.log(e.code + ' ' + e.errno));`;
  const r = spawnSync(process.execPath, ['-r', 'tsx/cjs', '-e', code], { encoding: 'utf8', timeout: 20_000 });
  assert.is(r.signal, null, 'the process had to be killed: something kept the event loop alive');
  assert.is(r.status, 0, r.stderr);
  assert.is(r.stdout.trim(), `ENOENT ${os.constants.errno.ENOENT}`);
});


test('ublkUapi: the upstream command encodings and USER_COPY positions (include/uapi/linux/ublk_cmd.h)', () => {
  const u = ublkAddon().ublkUapi;
  assert.is(u.fetchReq, 0xc0107520, "UBLK_U_IO_FETCH_REQ = _IOWR('u', 0x20, struct ublksrv_io_cmd)");
  assert.is(u.commitAndFetchReq, 0xc0107521);
  assert.is(u.descSize, 24);
  assert.equal([u.descOpFlags, u.descSectors, u.descStartSector], [0, 4, 8]);
  assert.equal([u.userCopyBase, u.userCopyQueueStride, u.userCopyTagStride], [0x80000000, 2 ** 41, 2 ** 25]);
});

/**
 * Runs `ops` operations queued by `queue` (with the loop, a channel and a
 * descriptor of the scratch file) on an I/O loop on this thread; their
 * results by tag.
 */
function onLoop(ops: number, queue: (loop: IoLoop, ch: Channel, fd: number) => void): number[] {
  const { port1, port2 } = new MessageChannel();
  const wakeFd = loadNative().eventfd();
  const loop = new IoLoop(port2, wakeFd, () => {}, 1);
  const fd = fs.openSync(img, 'r+');
  const res: number[] = [];
  let n = 0;
  const ch: Channel = { pump() {}, fail(e) { throw e; }, complete(tag, r) { res[tag] = r; if (++n === ops) loop.stop(); } };
  try {
    queue(loop, ch, fd);
    loop.run(() => n === ops);
  } finally { fs.closeSync(fd); loadNative().close(wakeFd); port1.close(); }
  return res;
}

test('an I/O loop\'s ublk command reaches the kernel as a URING_CMD (a regular file refuses it); a queue beyond 16 bits never leaves the ring', () => {
  const res = onLoop(2, (loop, ch, fd) => {
    loop.pushUblk(ch, 0, fd, ublkAddon().ublkUapi.fetchReq, 0, 0, -1);
    loop.pushUblk(ch, 1, fd, ublkAddon().ublkUapi.fetchReq, 0x10000, 0, -1);
  });
  assert.is(res[0], -95, 'EOPNOTSUPP: a regular file has no uring_cmd (the command was well formed)');
  assert.is(res[1], -22, 'queue 65536: EINVAL from the ring');
});

test('zero copy\'s fixed slots: a sparse table of the I/O loop\'s ring; an empty slot fails in the kernel, one beyond the table never leaves the ring', () => {
  const res = onLoop(2, (loop, ch, fd) => {
    assert.is(loop.sparseBuffers(4), 0, 'four empty slots');
    loop.pushFixed(ch, 0, OP.READ, fd, 3, 0, 4096, 0);
    loop.pushFixed(ch, 1, OP.READ, fd, 4, 0, 4096, 0);
  });
  assert.is(res[0], -14, 'EFAULT: slot 3 holds no buffer (ublk would have put a request there)');
  assert.is(res[1], -22, 'slot 4 is beyond the table: EINVAL from the ring');
});

test.after(() => fs.rmSync(dir, { recursive: true, force: true }));
test.run();
