// The CLI end to end on a real filesystem image: import a 1 GiB ext4 image
// (made by mkfs.ext4 -d from real files), export it, compare sha256.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import * as path from 'path';
import { execFileSync, spawnSync } from 'child_process';
import { createHash } from 'crypto';
import { tmpdir, skip } from './helpers/util';

const root = path.join(__dirname, '..');
const cli = path.join(root, 'bin', 'strata');
const SIZE_MB = Number(process.env.STRATA_CLI_IMAGE_MB ?? 1024);
const dir = tmpdir('cli');
const mkfs = ['/usr/sbin/mkfs.ext4', '/sbin/mkfs.ext4'].find((p) => fs.existsSync(p));

function sha256File(p: string): string {
  const h = createHash('sha256');
  const fd = fs.openSync(p, 'r');
  const buf = Buffer.allocUnsafe(8 << 20);
  let pos = 0, n: number;
  while ((n = fs.readSync(fd, buf, 0, buf.length, pos)) > 0) { h.update(buf.subarray(0, n)); pos += n; }
  fs.closeSync(fd);
  return h.digest('hex');
}

function strata(...args: string[]) {
  return spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', maxBuffer: 1 << 24 });
}

test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

test('dedup-report: exact savings at 4/16/64/128 KiB on an image with known duplicates', () => {
  const B = 4096;
  const img = Buffer.alloc(256 * B);
  for (let b = 0; b < 64; b++) for (let i = 0; i < B; i += 4) img.writeUInt32LE((b * 7919 + i * 31 + 12345) >>> 0, b * B + i);
  img.copy(img, 64 * B, 0, 64 * B);                                               // a duplicate 256 KiB run
  for (let x = 192; x < 256; x++) img.copy(img, x * B, ((x * 3) % 64) * B, ((x * 3) % 64 + 1) * B); // 4 KiB shuffled copies
  fs.writeFileSync(path.join(dir, 'dd.img'), img);
  const store = path.join(dir, 'ddstore');
  const imp = strata('import', path.join(dir, 'dd.img'), '--store', store, '--codec', 'none');
  assert.is(imp.status, 0, imp.stderr);
  const layer = imp.stdout.trim();
  const r = strata('dedup-report', layer, '--store', store, '--json');
  assert.is(r.status, 0, r.stderr);
  const rep = JSON.parse(r.stdout);
  assert.is(rep.logicalBytes, img.length);
  assert.is(rep.zeroBytes, 64 * B);
  const row = (kib: number) => rep.rows.find((x: { blockSize: number }) => x.blockSize === kib * 1024);
  assert.is(row(4).dataBytes, 192 * B);
  assert.is(row(4).uniqueBytes, 64 * B, '4 KiB: every shuffled block is a copy');
  for (const kib of [16, 64, 128]) {
    assert.is(row(kib).uniqueBytes, 128 * B, `${kib} KiB: only the aligned run deduplicates`);
    assert.is(row(kib).ratio, 1.5);
  }
  const text = strata('dedup-report', layer, '--store', store);
  assert.match(text.stdout, /4 KiB .* 3\.00×/);
});

if (!mkfs) {
  skip('cli: mkfs.ext4 (e2fsprogs) is not installed; the 1 GiB ext4 round trip needs it');
} else {
  test(`import → export of a ${SIZE_MB} MiB ext4 image is byte for byte identical (sha256)`, () => {
    // Real content: a slice of this machine's libraries and docs, plus a duplicate tree.
    const src = path.join(dir, 'src');
    fs.mkdirSync(src);
    const total = Math.min(300, SIZE_MB / 4) * 1024 * 1024;
    for (const from of ['/usr/lib/x86_64-linux-gnu', '/usr/share/doc', '/usr/bin']) {
      if (!fs.existsSync(from)) continue;
      let budget = total / 3; // a share per source, so every one contributes
      for (const name of fs.readdirSync(from)) {
        const p = path.join(from, name);
        let st: fs.Stats;
        try { st = fs.lstatSync(p); } catch { continue; }
        if (!st.isFile() || st.size > budget) continue;
        fs.mkdirSync(path.join(src, path.basename(from)), { recursive: true });
        fs.copyFileSync(p, path.join(src, path.basename(from), name));
        budget -= st.size;
      }
    }
    // A duplicate tree, so import has whole files to deduplicate.
    const first = fs.readdirSync(src)[0];
    assert.ok(first, 'no source files were copied');
    fs.cpSync(path.join(src, first), path.join(src, `${first}-copy`), { recursive: true });
    const img = path.join(dir, 'rootfs.ext4');
    execFileSync(mkfs!, ['-q', '-F', '-d', src, img, `${SIZE_MB}M`], { stdio: 'inherit' });
    fs.rmSync(src, { recursive: true, force: true });
    const want = sha256File(img);

    const imp = strata('import', img, '--store', path.join(dir, 'store'), '--codec', 'zstd');
    assert.is(imp.status, 0, imp.stderr);
    const lines = imp.stdout.trim().split('\n');
    const id = lines[lines.length - 1];
    assert.match(id, /^[0-9a-f]{32}$/, 'the last line printed is the layer id');
    console.log(`  ${imp.stderr.trim().split('\n').pop()}`);

    const out = path.join(dir, 'out.img');
    const exp = strata('export', id, out, '--store', path.join(dir, 'store'));
    assert.is(exp.status, 0, exp.stderr);
    assert.is(exp.stdout.trim(), want, 'export reports the sha256 of what it wrote');
    assert.is(fs.statSync(out).size, SIZE_MB * 1024 * 1024);
    assert.is(sha256File(out), want, 'exported image equals the input');
    // Zero extents are written as holes.
    assert.ok(fs.statSync(out).blocks * 512 < SIZE_MB * 1024 * 1024, 'export is sparse');

    const insp = strata('inspect', id, '--store', path.join(dir, 'store'), '--json');
    assert.is(insp.status, 0, insp.stderr);
    const info = JSON.parse(insp.stdout);
    assert.is(info.virtualSize, SIZE_MB * 1024 * 1024);
    assert.is(info.codec, 'zstd');
    assert.ok(info.compressedSize < info.dataSize, 'data is compressed');
  });
}

test('CLI: bad input gives a clear message and a non-zero exit', () => {
  const r1 = strata('import', path.join(dir, 'missing.img'), '--store', path.join(dir, 'store2'));
  assert.is.not(r1.status, 0);
  assert.match(r1.stderr, /cannot open image/);
  const r2 = strata('import', '/etc/hostname', '--store', path.join(dir, 'store2'), '--codec', 'gzip');
  assert.is.not(r2.status, 0);
  assert.match(r2.stderr, /unknown codec/);
  const r3 = strata('export', 'nope', path.join(dir, 'o'), '--store', path.join(dir, 'store2'));
  assert.is.not(r3.status, 0);
  assert.match(r3.stderr, /invalid layer id/);
  const r4 = strata('import', '/etc/hostname');
  assert.is(r4.status, 2);
  assert.match(r4.stderr, /--store STORE is required/);
  const r5 = strata('gc', '--store', path.join(dir, 'store2'), '--grace', 'soon');
  assert.is.not(r5.status, 0);
  assert.match(r5.stderr, /bad duration "soon"/);
});

test('gc: a dry run by default says what would go; --apply removes it', () => {
  const store = path.join(dir, 'gcstore');
  const leftover = path.join(store, 'layers', 'ab'.repeat(16), 'data'); // a failed upload's data, no header
  fs.mkdirSync(path.dirname(leftover), { recursive: true });
  fs.writeFileSync(leftover, Buffer.alloc(3 << 20));
  const old = new Date(Date.now() - 3 * 86_400_000);
  fs.utimesSync(leftover, old, old);
  const dry = strata('gc', '--store', store);
  assert.is(dry.status, 0, dry.stderr);
  assert.match(dry.stdout, /dry run .*would remove 1 objects, 3\.0 MiB/);
  assert.match(dry.stdout, /layer without a header/);
  assert.ok(fs.existsSync(leftover));
  const young = strata('gc', '--store', store, '--grace', '7d', '--apply');
  assert.match(young.stdout, /removed 0 objects/);
  assert.ok(fs.existsSync(leftover), 'younger than a 7-day grace period: kept');
  const apply = strata('gc', '--store', store, '--apply', '--json');
  assert.is(apply.status, 0, apply.stderr);
  assert.is(JSON.parse(apply.stdout).removed.length, 1);
  assert.not.ok(fs.existsSync(leftover));
});

test.run();
