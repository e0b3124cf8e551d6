// The sandbox flow end to end (docs/sandbox.md): a Debian guest boots with
// its root disk served by strata over NBD, takes disk-only snapshots (one
// with the filesystem frozen, one crash-consistent), and a second daemon with
// an empty data directory on the same object store checks both snapshots
// from the host (fsck, every synced file by content) and cold-boots a new
// guest from the frozen one.
//
//   node -r tsx/cjs test/sandbox/run.ts [--kernel 7.3|6.12] [--keep] [--timeout SECONDS]
//   npm run test:sandbox [-- --kernel 6.12]
//
// Ends with "N passed, N failed, N skipped"; a missing prerequisite (QEMU,
// mmdebstrap, the kernel, ...) is a skip, said with its reason.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import {
  check, skip, note, summary, sh, run, which, onCleanup, cleanupAll, sleep,
  Daemon, Guest, type GuestSpec, fileContent, fileCommand, sha256, failed,
} from './vm';

const argv = process.argv.slice(2);
const opt = (name: string, def: string) => { const i = argv.indexOf(name); return i >= 0 && argv[i + 1] ? argv[i + 1] : def; };
const KERNEL = opt('--kernel', process.env.STRATA_SANDBOX_KERNEL ?? '7.3');
const KEEP = argv.includes('--keep');
const TIMEOUT_S = Number(opt('--timeout', process.env.STRATA_SANDBOX_TIMEOUT_S ?? '900'));
const ROOT = path.join(__dirname, '..', '..');
const GUEST_DIR = '/root/strata';
const MiB = 1 << 20;

// Written and synced before snapshot A (frozen) ...
const FILES_A: Array<[string, number]> = [['a1', 1 * MiB], ['a2', 3 * MiB], ['a3', 8 * MiB]];
// ... and after it, before snapshot B (crash-consistent): a1 rewritten, two new files.
const FILES_B: Array<[string, string, number]> = [['a1', 'a1v2', 1 * MiB], ['b1', 'b1', 2 * MiB], ['b2', 'b2', 6 * MiB]];

const t0 = Date.now();
const secs = (ms: number) => `${(ms / 1000).toFixed(1)} s`;
let finishing = false;
const daemons: Daemon[] = [];

async function finish(code?: number): Promise<never> {
  if (finishing) { await sleep(1 << 30); }
  finishing = true;
  if (failed) {
    for (const d of daemons) {
      const bad = d.out().split('\n').filter((l) => /"level":(40|50|60)/.test(l)).slice(-15);
      if (bad.length) console.log(`     daemon ${d.name}: its last warnings and errors:\n${bad.map((l) => `     | ${l.slice(0, 600)}`).join('\n')}`);
    }
  }
  await cleanupAll();
  console.log(`sandbox on kernel ${KERNEL}: ${secs(Date.now() - t0)}`);
  console.log(summary());
  process.exit(code ?? (failed ? 1 : 0));
}

const timer = setTimeout(() => {
  check(false, `global timeout: the flow did not finish within ${TIMEOUT_S} s`);
  void finish(1);
}, TIMEOUT_S * 1000);
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.on(sig, () => { check(false, `interrupted by ${sig}`); void finish(130); });
}

interface Boot { label: string; ms: number; uptime: number; fetches: number; fetchBytes: number }

/** Boots a guest on `uri`, waits for the ready marker and reports it (cache fetches during the boot from `d`). */
async function boot(d: Daemon, name: string, dir: string, spec: GuestSpec, uri: string, label: string,
  opts: { trace?: string; kernelNbd?: boolean } = {}): Promise<{ g: Guest; b: Boot }> {
  const m0 = await d.metrics();
  const g = new Guest(name, dir, spec, uri, opts);
  try {
    const r = await g.ready();
    const m1 = await d.metrics();
    const b: Boot = {
      label, ms: r.ms, uptime: r.uptime,
      fetches: (m1.strata_cache_fetches_total ?? 0) - (m0.strata_cache_fetches_total ?? 0),
      fetchBytes: (m1.strata_cache_fetch_bytes_total ?? 0) - (m0.strata_cache_fetch_bytes_total ?? 0),
    };
    check(true, `${name}: ${label}: STRATA-READY after ${secs(r.ms)} (guest uptime ${r.uptime.toFixed(1)} s)`);
    return { g, b };
  } catch (e) {
    check(false, `${name}: ${label}: ${(e as Error).message}`);
    console.log(`     console tail of ${name}:\n${g.consoleText().split('\n').slice(-30).map((l) => `     | ${l}`).join('\n')}`);
    throw e;
  }
}

const bootLine = (b: Boot) =>
  `boot time (QEMU start to STRATA-READY): ${b.label}: ${secs(b.ms)} (guest uptime ${b.uptime.toFixed(1)} s; ` +
  `${b.fetches} frames, ${(b.fetchBytes / MiB).toFixed(1)} MiB fetched from the store during the boot)`;

/** Writes files through the agent (content from their names), then sync; checks the guest's sha256 against ours. */
async function writeFiles(g: Guest, files: Array<[string, string, number]>): Promise<void> {
  for (const [file, seed, bytes] of files) await g.sh(fileCommand(seed, bytes, `${GUEST_DIR}/${file}`), 300_000);
  await g.sh('sync', 300_000);
  const sums = await g.sh(`cd ${GUEST_DIR} && sha256sum ${files.map((f) => f[0]).join(' ')}`);
  for (const [file, seed, bytes] of files) {
    const want = sha256(fileContent(seed, bytes));
    check(sums.includes(`${want}  ${file}`), `${g.name}: ${file} (${bytes / MiB} MiB from '${seed}') written and synced, same sha256 in the guest`);
  }
}

/** The host's check of one snapshot through daemon `d`: copy out, fsck, every expected file by content. */
async function checkSnapshot(d: Daemon, tmp: string, label: string, layer: string,
  why: 'crash-consistent' | 'taken frozen' | 'taken after a clean shutdown',
  expect: Map<string, Buffer | null>): Promise<void> {
  const dev = await d.createDevice(layer, `check-${label}`);
  const img = path.join(tmp, `snapshot-${label}.img`);
  const t = Date.now();
  const copier = which('nbdcopy')
    ? await run('nbdcopy', [dev.uri, img], 600_000)
    : await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', dev.uri, img], 600_000);
  check(copier.code === 0, `snapshot ${label}: copied out of daemon ${d.name} over NBD in ${secs(Date.now() - t)}${copier.code ? `: ${copier.out.trim()}` : ''}`);
  check((await d.deleteDevice(dev.id)) === 204, `snapshot ${label}: DELETE its check device`);
  if (copier.code !== 0) return;
  onCleanup(`rm ${img}`, () => fs.rmSync(img, { force: true }));
  const features = (await sh(`dumpe2fs -h ${img} 2>/dev/null | grep -i '^Filesystem features'`).catch(() => '')).trim();
  const dirty = /needs_recovery/.test(features);
  if (why === 'crash-consistent') {
    note(`snapshot ${label}: journal ${dirty ? 'needs recovery (replaying it on the copy)' : 'is clean'}`);
    const r = await run('e2fsck', ['-y', '-E', 'journal_only', img]);
    check(r.code === 0 || r.code === 1, `snapshot ${label}: e2fsck -E journal_only replayed the journal (exit ${r.code})${r.code > 1 ? `: ${r.out.trim().slice(-800)}` : ''}`);
  } else {
    check(!dirty, `snapshot ${label}: ${why}, the filesystem needs no journal recovery${dirty ? ` (${features})` : ''}`);
  }
  const fsck = await run('e2fsck', ['-fn', img]);
  check(fsck.code === 0, `snapshot ${label}: e2fsck -fn is clean (exit ${fsck.code})${fsck.code ? `:\n${fsck.out.trim().slice(-1500)}` : ''}`);
  for (const [file, want] of expect) {
    const out = path.join(tmp, `dump-${label}-${file}`);
    fs.rmSync(out, { force: true });
    const r = await run('debugfs', ['-R', `dump -p ${GUEST_DIR}/${file} ${out}`, img]);
    const got = fs.existsSync(out) ? fs.readFileSync(out) : null;
    fs.rmSync(out, { force: true });
    if (want === null) {
      check(got === null, `snapshot ${label}: ${file} is absent (written after it)`);
    } else {
      check(got !== null && got.equals(want), `snapshot ${label}: ${file} has its content (${got === null ? `missing: ${r.out.trim().slice(-300)}` : `${got.length} bytes, sha256 ${sha256(got).slice(0, 16)}…`})`);
    }
  }
}

/**
 * Turns QEMU's block trace log into the benchmark's trace: requests in issue
 * order, [ms since the first, offset, length, 1 for a write].
 */
function saveTrace(log: string, out: string, meta: Record<string, unknown>): void {
  let text = '';
  try { text = fs.readFileSync(log, 'utf8'); } catch { /* none */ }
  const reqs: Array<[number, number, number, number]> = [];
  let t0 = -1;
  for (const line of text.split('\n')) {
    const m = /@(\d+\.\d+):blk_co_p(read|write)v .* offset (\d+) bytes (\d+)/.exec(line);
    if (!m) continue;
    const t = Number(m[1]) * 1000;
    if (t0 < 0) t0 = t;
    reqs.push([Math.round((t - t0) * 1000) / 1000, Number(m[3]), Number(m[4]), m[2] === 'write' ? 1 : 0]);
  }
  if (check(reqs.length > 100, `vm2: QEMU traced the guest's block requests during the boot (${reqs.length}; ${reqs.filter((r) => !r[3]).length} reads)`)) {
    fs.writeFileSync(out, JSON.stringify({ ...meta, requests: reqs }));
    note(`block trace of the boot kept for npm run bench:coldstart: ${out}`);
  }
}

async function main(): Promise<void> {
  // ---------------------------------------------------------- prerequisites
  const lack = ['qemu-system-x86_64', 'e2fsck', 'debugfs', 'dumpe2fs'].filter((c) => !which(c));
  if (!which('nbdcopy') && !which('qemu-img')) lack.push('nbdcopy or qemu-img');
  if (lack.length) { skip(`sandbox flow: missing ${lack.join(', ')} (npm run test:sandbox installs them)`); return; }
  const built = await run('bash', [path.join(ROOT, 'scripts/sandbox/image.sh'), '--kernel', KERNEL], 3_600_000);
  if (built.code === 3) { skip(`sandbox flow: ${built.out.split('\n').filter((l) => /missing:/.test(l)).join('; ') || built.out.trim().slice(-300)}`); return; }
  const env = Object.fromEntries(built.out.split('\n').map((l) => /^(SANDBOX_[A-Z_]+)=(.*)$/.exec(l)).filter(Boolean).map((m) => [m![1], m![2]]));
  if (!check(built.code === 0 && !!env.SANDBOX_IMAGE && !!env.SANDBOX_INITRD,
    `scripts/sandbox/image.sh --kernel ${KERNEL}: image and initramfs${built.code ? ` (exit ${built.code}): ${built.out.trim().slice(-1500)}` : ''}`)) return;
  note(`image ${env.SANDBOX_IMAGE}; kernel ${env.SANDBOX_ABI}; initramfs ${env.SANDBOX_INITRD}`);
  const spec: GuestSpec = { kernel: env.SANDBOX_KERNEL, initrd: env.SANDBOX_INITRD, mem: 768, smp: 1 };

  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'strata-sandbox-'));
  onCleanup(`rm ${tmp}`, () => { if (KEEP) console.log(`     kept ${tmp}`); else fs.rmSync(tmp, { recursive: true, force: true }); });
  const store = path.join(tmp, 'store');
  fs.mkdirSync(store);
  const vmDir = path.join(tmp, 'vm');
  const boots: Boot[] = [];

  // ---------------------------------------------------------- daemon A
  const a = new Daemon('A', path.join(tmp, 'data-a'), store, path.join(tmp, 'daemon-a.log'));
  daemons.push(a);
  if (!check(await a.started(), `daemon A started (--data data-a --store store)`)) { console.log(a.out().slice(-2000)); return; }
  let t = Date.now();
  const imp = await a.longOp('/v1/templates', { path: env.SANDBOX_IMAGE });
  const tpl = imp?.template?.id as string;
  check(typeof tpl === 'string', `template imported through the API in ${secs(Date.now() - t)}: ${tpl}`);

  const devA = await a.createDevice(tpl, 'sandbox-1');
  check(true, `device sandbox-1 on the template: ${devA.uri}`);
  const first = await boot(a, 'vm1', vmDir, spec, devA.uri, 'daemon A, template, first boot');
  boots.push(first.b);
  const g1 = first.g;
  await g1.sh(`mkdir -p ${GUEST_DIR}`);
  await writeFiles(g1, FILES_A.map(([f, n]) => [f, f, n]));

  // snapshot A: frozen
  await g1.sh('fsfreeze -f /');
  let snapA: string;
  try {
    t = Date.now();
    snapA = (await a.longOp('/v1/devices/sandbox-1/snapshots'))?.snapshot?.id;
    check(typeof snapA === 'string', `snapshot A (filesystem frozen) in ${secs(Date.now() - t)}: ${snapA}`);
  } finally {
    await g1.sh('fsfreeze -u /');
  }
  // snapshot B: crash-consistent (synced, not frozen)
  await writeFiles(g1, FILES_B);
  t = Date.now();
  const snapB = (await a.longOp('/v1/devices/sandbox-1/snapshots'))?.snapshot?.id as string;
  check(typeof snapB === 'string', `snapshot B (crash-consistent, not frozen) in ${secs(Date.now() - t)}: ${snapB}`);
  check(await g1.poweroff(), 'vm1: poweroff through the agent, QEMU exited');
  check((await a.deleteDevice('sandbox-1')) === 204, 'DELETE sandbox-1');

  // second boot on the same template, daemon A's cache warm; QEMU logs the
  // guest's block requests, kept for the cold-start benchmark (bench/coldstart.ts)
  const devW = await a.createDevice(tpl, 'sandbox-2');
  const traceLog = path.join(tmp, 'vm2.trace');
  const warm = await boot(a, 'vm2', vmDir, spec, devW.uri, 'daemon A, template, fresh device, warm cache', { trace: traceLog });
  boots.push(warm.b);
  saveTrace(traceLog, path.join(path.dirname(env.SANDBOX_IMAGE), 'boot-trace.json'), { kernel: env.SANDBOX_ABI, image: env.SANDBOX_IMAGE, bootMs: warm.b.ms });
  check((await warm.g.sh(`ls ${GUEST_DIR} | wc -l`)).trim() === '0', 'vm2: a fresh device on the template has none of vm1\'s files');
  check(await warm.g.poweroff(), 'vm2: poweroff, QEMU exited');
  check((await a.deleteDevice('sandbox-2')) === 204, 'DELETE sandbox-2');
  check((await a.stop()) === 0, 'daemon A: SIGTERM, exit 0');

  // ---------------------------------------------------------- daemon B
  const dataB = path.join(tmp, 'data-b');
  fs.mkdirSync(dataB);
  check(fs.readdirSync(dataB).length === 0, 'daemon B gets an empty data directory');
  // B boots without boot profiles (fetch on miss, with readahead); C below with them.
  const b = new Daemon('B', dataB, store, path.join(tmp, 'daemon-b.log'), ['--boot-profiles', 'off']);
  daemons.push(b);
  if (!check(await b.started(), 'daemon B started on the same store (--boot-profiles off)')) { console.log(b.out().slice(-2000)); return; }
  const devC = await b.createDevice(snapA!, 'resumed-1');
  check(true, `daemon B: device resumed-1 on snapshot A: ${devC.uri}`);
  const cold = await boot(b, 'vm3', vmDir, spec, devC.uri, 'daemon B (empty data dir), snapshot A, cold cache, no boot profile');
  boots.push(cold.b);
  check(cold.b.fetches > 0, `vm3: daemon B fetched from the store during the boot (${cold.b.fetches} frames)`);
  const ls = (await cold.g.sh(`ls ${GUEST_DIR}`)).split(/\s+/).filter(Boolean).sort();
  check(JSON.stringify(ls) === JSON.stringify(FILES_A.map((f) => f[0])), `vm3: ${GUEST_DIR} holds exactly ${FILES_A.map((f) => f[0]).join(' ')} (${ls.join(' ')})`);
  const sums = await cold.g.sh(`cd ${GUEST_DIR} && sha256sum ${FILES_A.map((f) => f[0]).join(' ')}`);
  for (const [f, n] of FILES_A) check(sums.includes(`${sha256(fileContent(f, n))}  ${f}`), `vm3: ${f} reads back with its content (sha256 in the guest)`);
  check(await cold.g.poweroff(), 'vm3: poweroff, QEMU exited');
  check((await b.deleteDevice('resumed-1')) === 204, 'DELETE resumed-1');

  // host-side checks of both snapshots, through daemon B
  const expectA = new Map<string, Buffer | null>(FILES_A.map(([f, n]) => [f, fileContent(f, n)]));
  for (const [f] of FILES_B) if (!expectA.has(f)) expectA.set(f, null);
  await checkSnapshot(b, tmp, 'A', snapA!, 'taken frozen', expectA);
  const expectB = new Map<string, Buffer | null>(FILES_A.map(([f, n]) => [f, fileContent(f, n)]));
  for (const [f, seed, n] of FILES_B) expectB.set(f, fileContent(seed, n));
  await checkSnapshot(b, tmp, 'B', snapB, 'crash-consistent', expectB);
  check((await b.stop()) === 0, 'daemon B: SIGTERM, exit 0');

  // ---------------------------------------------------------- daemon C: cold, with the boot profile
  // Snapshot A inherited a profile from what vm1 read before it was taken.
  // C also serves NBD on a loopback TCP port, for the kernel nbd driver's boot below.
  const c = new Daemon('C', path.join(tmp, 'data-c'), store, path.join(tmp, 'daemon-c.log'), ['--tcp', '0']);
  daemons.push(c);
  if (!check(await c.started(), 'daemon C started on the same store (empty data dir, boot profiles on, --tcp 0)')) { console.log(c.out().slice(-2000)); return; }
  const devP = await c.createDevice(snapA!, 'resumed-2');
  const prof = await boot(c, 'vm4', vmDir, spec, devP.uri, 'daemon C (empty data dir), snapshot A, cold cache, boot profile');
  boots.push(prof.b);
  const mc = await c.metrics();
  check((mc.strata_fetch_prefetch_total ?? 0) > 0, `daemon C prefetched snapshot A's boot profile (${mc.strata_profile_prefetched_frames_total ?? 0} profile frames present, ${mc.strata_fetch_prefetch_total ?? 0} fetched ahead of the guest)`);
  const sumsP = await prof.g.sh(`cd ${GUEST_DIR} && sha256sum ${FILES_A.map((f) => f[0]).join(' ')}`);
  for (const [f, n] of FILES_A) check(sumsP.includes(`${sha256(fileContent(f, n))}  ${f}`), `vm4: ${f} reads back with its content`);
  check(await prof.g.poweroff(), 'vm4: poweroff, QEMU exited');
  check((await c.deleteDevice('resumed-2')) === 204, 'DELETE resumed-2');

  // ---------------------------------------------------------- the kernel nbd driver
  // A guest whose root is /dev/nbd0: its initramfs connects the guest
  // kernel's nbd driver to daemon C over TCP (nbd-client), on snapshot B (the
  // crash-consistent one: the mount replays its journal). It reads B's files,
  // writes one more and powers off; a snapshot of the device shows that file
  // from the host.
  const devK = env.SANDBOX_KERNEL_NBD === '1' ? await c.createDevice(snapB, 'resumed-3') : null;
  const tcpUri = devK?.json?.nbd?.tcpUri as string | undefined;
  if (!devK) skip('vm5 (root on the guest kernel\'s nbd driver): the initramfs has no nbd-client (see image.sh\'s "missing:" line)');
  else if (check(typeof tcpUri === 'string', `daemon C: device resumed-3 on snapshot B, served on TCP: ${tcpUri}`)) {
    const kb = await boot(c, 'vm5', vmDir, spec, tcpUri!, 'daemon C, snapshot B, root on the guest kernel\'s nbd driver', { kernelNbd: true });
    boots.push(kb.b);
    const src = (await kb.g.sh('findmnt -no SOURCE /')).trim();
    check(src === '/dev/nbd0', `vm5: / is mounted from /dev/nbd0 (${src})`);
    const size = Number((await kb.g.sh('cat /sys/block/nbd0/size')).trim()) * 512;
    check(size === fs.statSync(env.SANDBOX_IMAGE).size, `vm5: /dev/nbd0 has the template's size (${size} bytes)`);
    const expectK = new Map<string, Buffer>(FILES_A.map(([f, n]) => [f, fileContent(f, n)]));
    for (const [f, seed, n] of FILES_B) expectK.set(f, fileContent(seed, n));
    const sumsK = await kb.g.sh(`cd ${GUEST_DIR} && sha256sum ${[...expectK.keys()].join(' ')}`);
    for (const [f, want] of expectK) check(sumsK.includes(`${sha256(want)}  ${f}`), `vm5: ${f} reads back with snapshot B's content`);
    await writeFiles(kb.g, [['k1', 'k1', 5 * MiB]]);
    check(await kb.g.poweroff(), 'vm5: poweroff, QEMU exited');
    t = Date.now();
    const snapK = (await c.longOp('/v1/devices/resumed-3/snapshots'))?.snapshot?.id as string;
    check(typeof snapK === 'string', `snapshot K of resumed-3 after the guest's poweroff in ${secs(Date.now() - t)}: ${snapK}`);
    check((await c.deleteDevice('resumed-3')) === 204, 'DELETE resumed-3');
    expectK.set('k1', fileContent('k1', 5 * MiB));
    // the guest shut down cleanly: its root filesystem was unmounted, nothing to replay
    await checkSnapshot(c, tmp, 'K', snapK, 'taken after a clean shutdown', expectK);
  }
  check((await c.stop()) === 0, 'daemon C: SIGTERM, exit 0');

  console.log('');
  for (const x of boots) console.log(bootLine(x));
  if (first.b.fetches === 0) note('(daemon A\'s import left the template in its local cache: its first boot fetched nothing from the store; the cold boot is daemon B\'s)');
}

main().catch((e) => { if (!finishing) check(false, `sandbox flow: ${(e as Error).stack ?? e}`); })
  .finally(() => { clearTimeout(timer); void finish(); });
