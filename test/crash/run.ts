// `npm run test:crash [-- --points N --seed S --kills acks,time,hook,strace | --daemon]`:
// the slow lane of the crash harness (1,000 crash points by default; --daemon
// kills `node src/server.js` serving the device over NBD instead).
import { runEngineCrashes, type Kill } from './harness';
import { runDaemonCrashes } from './daemon';

const arg = (name: string, def: string) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : def;
};

(async () => {
  const points = Number(arg('points', '1000'));
  const seed = Number(arg('seed', String(Date.now() % 1e9)));
  const kills = arg('kills', '') ? arg('kills', '').split(',') as Kill[] : undefined;
  console.log(`crash harness: ${points} crash points, seed ${seed}`);
  let n = 0;
  const log = (l: string) => { if (++n % 50 === 0 || process.env.VERBOSE) console.log(l); };
  const stats = process.argv.includes('--daemon') ? await runDaemonCrashes({ seed, points, log }) : await runEngineCrashes({ seed, points, kills, log });
  console.log(`kills: ${JSON.stringify(stats.byKill)}; crash points reached: ${JSON.stringify(stats.hookHits)}`);
  console.log(`${stats.points} crash points, ${stats.opsAcked} ops acknowledged, ${stats.inflightAtKill} in flight at a kill, ` +
    `${stats.blocksVerified} blocks and ${stats.snapshotsVerified} snapshots verified, 0 failures (seed ${seed}, ${(stats.ms / 1000).toFixed(0)} s)`);
})().catch((e) => { console.error(`FAIL: ${e.message}`); process.exit(1); });
