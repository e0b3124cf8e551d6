// Interop with real NBD clients: nbdinfo, qemu-img, nbdcopy (libnbd) and
// fio's nbd engine, against the server running in this process.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import { execFile } from 'child_process';
import { createHash } from 'crypto';
import { nbdFixture, Fixture } from './helpers/nbd-fixture';
import { skip } from './helpers/util';

const tools = ['nbdinfo', 'nbdcopy', 'qemu-img', 'fio'];
const have = (t: string) => ['/usr/bin/', '/usr/sbin/', '/bin/'].some((d) => fs.existsSync(d + t));
const missing = tools.filter((t) => !have(t));

function run(cmd: string, args: string[], timeoutMs = 120_000): Promise<{ code: number; out: string; err: string }> {
  return new Promise((res) => {
    execFile(cmd, args, { timeout: timeoutMs, maxBuffer: 1 << 26, encoding: 'utf8' }, (e, out, err) => {
      res({ code: e ? (typeof (e as { code?: unknown }).code === 'number' ? (e as { code: number }).code : 1) : 0, out, err });
    });
  });
}
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

if (missing.length) {
  skip(`nbd-interop: ${missing.join(', ')} not installed (npm test installs them as root: fio libnbd-bin qemu-utils)`);
} else {
  let f: Fixture;
  test.before(async () => { f = await nbdFixture('interop', 8192); await f.addDevice('dev'); });
  test.after(async () => { await f.close(); });

  test('nbdinfo --json shows flags, block sizes and base:allocation', async () => {
    const r = await run('nbdinfo', ['--json', f.uri('dev')]);
    assert.is(r.code, 0, r.err);
    const info = JSON.parse(r.out).exports[0];
    assert.is(info['export-size'], f.img.length);
    assert.is(info.block_size_minimum, 512);
    assert.is(info.block_size_preferred, 4096);
    assert.is(info.block_size_maximum, 32 * 1024 * 1024);
    for (const k of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_fast_zero', 'can_multi_conn', 'can_cache']) assert.is(info[k], true, k);
    assert.ok(info.contexts.includes('base:allocation'));
    const map = await run('nbdinfo', ['--map', '--json', f.uri('dev')]);
    assert.is(map.code, 0, map.err);
    const ents = JSON.parse(map.out) as Array<{ offset: number; length: number; type: number }>;
    for (const e of ents) {
      if (e.type & 2) assert.ok(f.img.subarray(e.offset, e.offset + e.length).every((x) => x === 0), `zero at ${e.offset}`);
    }
    assert.ok(ents.some((e) => e.type & 2) && ents.some((e) => !(e.type & 2)), 'both data and holes reported');
  });

  test('qemu-img convert of the export equals the layer image (sha256)', async () => {
    const out = `${f.dir}/qemu.raw`;
    const r = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', f.uri('dev'), out]);
    assert.is(r.code, 0, r.err);
    assert.is(sha(fs.readFileSync(out)), sha(f.img));
    const exp = await f.engine.exportLayer(f.base, `${f.dir}/export.raw`);
    assert.is(exp.sha256, sha(f.img));
  });

  test('nbdcopy writes random data in; a snapshot of it, exported, matches', async () => {
    await f.addDevice('target');
    const rnd = Buffer.alloc(f.img.length);
    for (let i = 0; i < rnd.length; i += 4096) {
      if ((i / 4096) % 5 === 0) continue; // leave zero blocks for holes
      require('crypto').randomFillSync(rnd, i, 4096);
    }
    fs.writeFileSync(`${f.dir}/random.raw`, rnd);
    const r = await run('nbdcopy', [`${f.dir}/random.raw`, f.uri('target')]);
    assert.is(r.code, 0, r.err);
    const s = await f.devices.get('target')!.snapshot();
    const exp = await f.engine.exportLayer(s.id, `${f.dir}/snap.raw`);
    assert.is(exp.sha256, sha(rnd));
    // And served again: a device on the snapshot, read back with nbdcopy.
    await f.addDevice('resumed', s.id);
    const back = await run('nbdcopy', [f.uri('resumed'), `${f.dir}/back.raw`]);
    assert.is(back.code, 0, back.err);
    assert.is(sha(fs.readFileSync(`${f.dir}/back.raw`)), sha(rnd));
  });

  for (const jobs of [1, 2]) {
    test(`fio nbd engine, verify=crc32c, ${jobs} connection(s)`, async () => {
      const name = `fio${jobs}`;
      await f.addDevice(name);
      const size = f.img.length / jobs;
      const r = await run('fio', ['--name=verify', '--ioengine=nbd', `--uri=${f.uri(name)}`, '--rw=randwrite', '--bs=4k',
        '--iodepth=32', `--size=${size}`, `--numjobs=${jobs}`, `--offset_increment=${size}`, '--verify=crc32c',
        '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json']);
      assert.is(r.code, 0, r.err + r.out.slice(-2000));
      const j = JSON.parse(r.out.slice(r.out.indexOf('{')));
      for (const job of j.jobs) {
        assert.is(job.error, 0);
        assert.ok(job.write.io_bytes >= size * 1, 'wrote the whole range');
        assert.ok(job.read.io_bytes >= size * 1, 'verified by reading it back');
      }
    });
  }
}

test.run();
