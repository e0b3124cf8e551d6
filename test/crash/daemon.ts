// The crash harness through the daemon: `node src/server.js` serves the
// durable device over NBD (its native transmission path included); this
// process is the NBD client and the API client, drives the same seeded op
// stream, and kills the daemon with SIGKILL after k acknowledgements or t ms.
// Each restart resumes the device; what it serves is checked against the
// model (model.ts), and so is every snapshot layer, read over NBD.
import * as fs from 'fs';
import * as path from 'path';
import { spawn, type ChildProcess } from 'child_process';
import { ApiClient } from '../../src/api/client';
import { CMD, CMD_FLAG } from '../../src/nbd/protocol';
import { RawClient } from '../helpers/nbd-client';
import { makeImage, rng, tmpdir } from '../helpers/util';
import { B, Model, blockHashes, drive, opStream, type Target } from './model';
import type { CrashRunStats } from './harness';

const SERVER = path.join(__dirname, '..', '..', 'src', 'server.js');
const DEV = 'crashdev';

export async function runDaemonCrashes(o: { seed: number; points: number; maxOps?: number; log?: (l: string) => void }): Promise<CrashRunStats> {
  const t0 = Date.now();
  const log = o.log ?? (() => {});
  const r = rng(o.seed ^ 0xdae);
  const int = (n: number) => Math.floor(r() * n);
  const dir = tmpdir('crash-daemon');
  const blocks = 512;
  const stats: CrashRunStats = { seed: o.seed, points: 0, opsAcked: 0, inflightAtKill: 0, blocksVerified: 0, snapshotsVerified: 0, byKill: {}, hookHits: {}, ms: 0 };
  let daemon: ChildProcess | null = null;
  try {
    const img = makeImage(blocks, o.seed);
    fs.writeFileSync(`${dir}/img`, img);
    const model = new Model(img, o.seed, false);
    const api = new ApiClient(`${dir}/data/api.sock`);
    let layer = '';
    for (let epoch = 1; stats.points <= o.points; epoch++) {
      const final = stats.points === o.points;
      const where = `seed ${o.seed}, daemon life ${epoch}`;
      daemon = spawn(process.execPath, [SERVER, '--data', `${dir}/data`, ...(epoch === 1 ? ['--import', `${dir}/img`] : [])], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      daemon.stdout!.on('data', (d) => { out += d; });
      daemon.stderr!.on('data', (d) => { out += d; });
      const exited = new Promise<void>((res) => daemon!.on('close', () => res()));
      // Ready once devices are resumed and (first life) the template imported.
      await until(async () => fs.existsSync(`${dir}/data/api.sock`) && (await api.request('GET', '/v1/ready').then(() => true, () => false)), daemon, `${where}: ready`, () => out);
      if (epoch === 1) {
        layer = /"layer":"([0-9a-f]{32})"/.exec(out)![1];
        await api.request('POST', '/v1/devices', { layer, id: DEV, frontend: 'nbd' });
      }
      const sock = `${dir}/data/nbd.sock`;
      const c = await RawClient.open(sock, DEV);
      try {
        model.checkDevice(blockHashes(await readAll(c)));
        for (const s of await api.request<Array<{ id: string }>>('GET', '/v1/snapshots')) {
          if (model.known.has(s.id)) continue;
          const v = `v${epoch}`;
          await api.request('POST', '/v1/devices', { layer: s.id, id: v, frontend: 'nbd' });
          const vc = await RawClient.open(sock, v);
          model.checkLayer(s.id, blockHashes(await readAll(vc)));
          vc.close();
          await api.request('DELETE', `/v1/devices/${v}`);
        }
        model.layersChecked();
      } catch (e) { throw new Error(`${where}: ${(e as Error).message}\n${out.slice(-3000)}`); }
      if (final) { daemon.kill('SIGKILL'); await exited; break; }
      const count = 1 + int(o.maxOps ?? 120);
      const ops = opStream(o.seed, epoch, blocks, count);
      model.beginEpoch(epoch);
      let killed = false, acks = 0;
      const plan = r() < 0.5 ? { acks: int(count + 1) } : { ms: 20 + int(600) };
      const kill = () => { if (!killed) { killed = true; daemon!.kill('SIGKILL'); } };
      const timer = plan.ms !== undefined ? setTimeout(kill, plan.ms) : null;
      const ok = (rep: { error: number }, what: string) => { if (rep.error) throw new Error(`${what}: NBD error ${rep.error}`); };
      const t: Target = {
        write: async (off, data, fua) => ok(await c.write(off, data, fua ? CMD_FLAG.FUA : 0), 'write'),
        zero: async (off, len, fua, noHole) => ok(await c.request(CMD.WRITE_ZEROES, off, len, { flags: (fua ? CMD_FLAG.FUA : 0) | (noHole ? CMD_FLAG.NO_HOLE : 0) }), 'write zeroes'),
        trim: async (off, len) => ok(await c.request(CMD.TRIM, off, len), 'trim'),
        flush: async () => ok(await c.request(CMD.FLUSH, 0, 0), 'flush'),
        snapshot: async () => {
          let op = await api.request<{ id: string; state: string; result?: { snapshot: { id: string } }; error?: unknown }>('POST', `/v1/devices/${DEV}/snapshots`);
          while (op.state === 'running') { await sleep(20); op = await api.request('GET', `/v1/operations/${op.id}`); }
          if (op.state !== 'succeeded') throw new Error(`snapshot ${op.state}: ${JSON.stringify(op.error)}`);
          return op.result!.snapshot.id;
        },
      };
      await drive(t, o.seed, epoch, ops, 1 + int(4), {
        start: (op) => { if (!killed) model.start(op); },
        ack: (op, snap) => { if (killed) return; model.ack(op, snap); if (++acks === plan.acks) kill(); },
      }).catch((e: Error) => { if (!killed) throw new Error(`${where}: ${e.message}\n${out.slice(-3000)}`); });
      kill();
      if (timer) clearTimeout(timer);
      await exited;
      c.close();
      model.killed();
      stats.points++;
      stats.byKill[plan.acks !== undefined ? 'acks' : 'time'] = (stats.byKill[plan.acks !== undefined ? 'acks' : 'time'] ?? 0) + 1;
      log(`daemon life ${epoch}: killed after ${acks}/${count} acks`);
    }
    Object.assign(stats, model.stats);
    stats.ms = Date.now() - t0;
    return stats;
  } finally {
    daemon?.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function readAll(c: RawClient): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (let off = 0; off < c.size; off += 64 * B) {
    const rep = await c.read(off, Math.min(64 * B, c.size - off));
    if (rep.error) throw new Error(`read at ${off}: NBD error ${rep.error}`);
    parts.push(rep.data);
  }
  return Buffer.concat(parts);
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until(cond: () => boolean | Promise<boolean>, proc: ChildProcess, what: string, out: () => string): Promise<void> {
  const t0 = Date.now();
  while (!(await cond())) {
    if (proc.exitCode !== null || proc.signalCode) throw new Error(`${what}: the daemon exited: ${out().slice(-3000)}`);
    if (Date.now() - t0 > 60_000) throw new Error(`${what}: timed out: ${out().slice(-3000)}`);
    await sleep(25);
  }
}
