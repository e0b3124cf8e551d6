// The crash harness: one durable device lives through many processes. Each
// life (engine-child.ts) resumes it, reports what it holds, then drives a
// seeded stream of writes, zeroes, trims, FUA writes, flushes and snapshots;
// the harness kills it with SIGKILL at a moment it picks, and the next life
// reports what survived, checked against the reference model (model.ts).
// Kill moments: after k acknowledgements, after t ms (which may land in the
// resume itself), at a named crash point inside the engine
// (src/crash-point.ts), or at the n-th pwrite64 system call (strace).
import * as fs from 'fs';
import * as path from 'path';
import { spawn, spawnSync } from 'child_process';
import { Engine, Codec } from '../../src/index';
import { CRASH_POINTS } from '../../src/crash-point';
import { makeImage, rng, tmpdir } from '../helpers/util';
import { Model, opStream, type Op } from './model';
import type { ChildArgs } from './engine-child';

export type Kill = 'acks' | 'time' | 'hook' | 'strace';

export interface CrashRunOptions {
  seed: number;
  /** Crash points (child lives killed). */
  points: number;
  /** Kill moments to pick from (at random, per life). */
  kills?: Kill[];
  /** Ops per life: up to this many. */
  maxOps?: number;
  blocks?: number;
  log?: (line: string) => void;
}

export interface CrashRunStats {
  seed: number; points: number; opsAcked: number; inflightAtKill: number; blocksVerified: number;
  snapshotsVerified: number; byKill: Record<string, number>; hookHits: Record<string, number>; ms: number;
}

export const straceAvailable = (): boolean => spawnSync('strace', ['-V']).status === 0;

export async function runEngineCrashes(o: CrashRunOptions): Promise<CrashRunStats> {
  const t0 = Date.now();
  const log = o.log ?? (() => {});
  const blocks = o.blocks ?? 512;
  const kills = o.kills ?? ['acks', 'time', 'hook', ...(straceAvailable() ? ['strace' as const] : [])];
  const r = rng(o.seed ^ 0x5eed);
  const int = (n: number) => Math.floor(r() * n);
  const dir = tmpdir('crash');
  const stats: CrashRunStats = { seed: o.seed, points: 0, opsAcked: 0, inflightAtKill: 0, blocksVerified: 0, snapshotsVerified: 0, byKill: {}, hookHits: {}, ms: 0 };
  try {
    const img = makeImage(blocks, o.seed);
    fs.writeFileSync(`${dir}/img`, img);
    const e = await Engine.open({ store: `${dir}/store`, cacheDir: `${dir}/import` });
    const layer = (await e.importImage(`${dir}/img`, { codec: Codec.Lz4 })).id;
    await e.close();
    const model = new Model(img, o.seed, true);
    for (let epoch = 1; stats.points < o.points; epoch++) {
      const kill = kills[int(kills.length)];
      const count = 1 + int(o.maxOps ?? 120);
      const args: ChildArgs = { store: `${dir}/store`, cacheDir: `${dir}/cache`, layer, id: 'crashdev', seed: o.seed, epoch, count, window: 1 + int(4), known: [...model.known] };
      const plan = kill === 'acks' ? { acks: int(count + 1) } : kill === 'time' ? { ms: 100 + int(1500) } : {};
      const env: NodeJS.ProcessEnv = { ...process.env };
      let cmd = process.execPath;
      let argv = ['-r', 'tsx/cjs', path.join(__dirname, 'engine-child.ts'), JSON.stringify(args)];
      let what: string = kill;
      if (kill === 'hook') {
        // Fold-back runs at most once per life (at resume): only its first pass can be hit.
        const point = CRASH_POINTS[int(CRASH_POINTS.length)];
        env.STRATA_CRASH_AT = `${point}:${point.startsWith('fold.') ? 1 : 1 + int(3)}`;
        what = `hook ${env.STRATA_CRASH_AT}`;
      } else if (kill === 'strace') {
        const n = 1 + int(40);
        what = `strace pwrite64 #${n}`;
        argv = ['-f', '-qq', '-o', '/dev/null', '-e', 'trace=pwrite64', '-e', `inject=pwrite64:signal=KILL:when=${n}`, cmd, ...argv];
        cmd = 'strace';
      }
      const where = `seed ${o.seed}, life ${epoch} (${what}, ${count} ops, window ${args.window})`;
      const ops = opStream(o.seed, epoch, blocks, count);
      model.beginEpoch(epoch);
      const life = await runLife(cmd, argv, env, plan, model, ops, where);
      if (life.hookHit && env.STRATA_CRASH_AT) { const p = env.STRATA_CRASH_AT.split(':')[0]; stats.hookHits[p] = (stats.hookHits[p] ?? 0) + 1; }
      model.killed();
      stats.points++;
      stats.byKill[kill] = (stats.byKill[kill] ?? 0) + 1;
      log(`life ${epoch}: ${what}; ${life.acks}/${count} ops acked${life.verified ? '' : ', killed before it had read the device back'}`);
    }
    await checkLife(`${dir}/store`, `${dir}/cache`, layer, 'crashdev', model, `seed ${o.seed}, final check`);
    Object.assign(stats, model.stats);
    stats.ms = Date.now() - t0;
    return stats;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** A life that only reads the device (and new layers) back and checks them. */
export function checkLife(store: string, cacheDir: string, layer: string, id: string, model: Model, where: string): Promise<unknown> {
  model.beginEpoch(0);
  const args: ChildArgs = { store, cacheDir, layer, id, seed: model.seed, epoch: 0, count: 0, window: 1, known: [...model.known] };
  return runLife(process.execPath, ['-r', 'tsx/cjs', path.join(__dirname, 'engine-child.ts'), JSON.stringify(args)], process.env, { acks: 0 }, model, [], where, true);
}

/** One child life: feeds its reports to the model, kills it as planned. */
export function runLife(cmd: string, argv: string[], env: NodeJS.ProcessEnv, plan: { acks?: number; ms?: number },
  model: Model, ops: Op[], where: string, mustVerify = false): Promise<{ acks: number; verified: boolean; hookHit: boolean }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, argv, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let pid = 0, acks = 0, verified = false, killedByUs = false, failed: Error | null = null, buf = '', errText = '';
    const kill = () => {
      if (killedByUs) return;
      killedByUs = true;
      try { process.kill(pid || child.pid!, 'SIGKILL'); } catch { /* gone already */ }
    };
    const timer = plan.ms !== undefined ? setTimeout(kill, plan.ms) : null;
    // A life that hangs is a failure too (e.g. a resume that never ends).
    const watchdog = setTimeout(() => { failed ??= new Error(`${where}: the child did not finish within 120 s`); kill(); }, 120_000);
    const line = (l: string) => {
      if (failed) return;
      try {
        const [tag, a1, a2] = l.split(' ');
        if (tag === 'pid') pid = Number(a1);
        else if (tag === 'dev') model.checkDevice(a1.split(','));
        else if (tag === 'layer') model.checkLayer(a1, a2.split(','));
        else if (tag === 'verified') { model.layersChecked(); verified = true; if (plan.acks === 0) kill(); }
        else if (tag === 's') model.start(ops[Number(a1)]);
        else if (tag === 'a') { model.ack(ops[Number(a1)], a2); if (++acks === plan.acks) kill(); }
        else if (tag === 'done') kill();
        else if (tag === 'error') failed = new Error(`${where}: the child failed: ${l.slice(6)}`);
      } catch (e) {
        failed = new Error(`${where}: ${(e as Error).message}`);
        kill();
      }
    };
    child.stdout!.setEncoding('utf8');
    child.stdout!.on('data', (d: string) => {
      buf += d;
      for (let i; (i = buf.indexOf('\n')) >= 0;) { const l = buf.slice(0, i); buf = buf.slice(i + 1); line(l); }
    });
    child.stderr!.on('data', (d) => { errText += d; });
    child.on('close', (code, signal) => {
      if (timer) clearTimeout(timer);
      clearTimeout(watchdog);
      const died = signal === 'SIGKILL' || code === 137 || killedByUs;
      if (!failed && !died) failed = new Error(`${where}: the child exited (${code ?? signal}) without being killed: ${errText.slice(-2000)}`);
      if (!failed && mustVerify && !verified) failed = new Error(`${where}: the device was not read back: ${errText.slice(-2000)}`);
      if (failed) reject(failed); else resolve({ acks, verified, hookHit: !killedByUs });
    });
  });
}
