// Child for the crash-point test (test/crash.test.ts): a fixed sequence that
// passes every crash point in src/crash-point.ts once (zeroing, a snapshot,
// a snapshot whose upload fails and is folded back), reporting starts and
// acks like engine-child.ts, and killed by the armed point (STRATA_CRASH_AT).
import { Engine } from '../../src/index';
import { FsObjectStore } from '../../src/store/fs';
import { payload, type Op } from './model';

export const B = 4096;
/** The sequence; op 6's snapshot fails (its data upload is refused) and is folded back. */
export const POINT_OPS: Op[] = [
  { i: 0, kind: 'write', off: 0, len: 4 * B, fua: false },
  { i: 1, kind: 'zero', off: 4 * B, len: 4 * B, fua: false, noHole: false },
  { i: 2, kind: 'flush' },
  { i: 3, kind: 'snapshot' },
  { i: 4, kind: 'write', off: 8 * B, len: 2 * B, fua: false },
  { i: 5, kind: 'zero', off: 10 * B, len: 2 * B, fua: false, noHole: false },
  { i: 6, kind: 'snapshot' },
  { i: 7, kind: 'write', off: 0, len: B, fua: true },
];
export const POINTS_SEED = 77;

const say = (l: string) => process.stdout.write(`${l}\n`);

if (require.main === module) (async () => {
  process.stdout.on('error', () => {});
  const [store, cacheDir, layer] = process.argv.slice(2);
  say(`pid ${process.pid}`);
  const fsStore = new FsObjectStore(store);
  let dataPuts = 0;
  const failing = Object.assign(Object.create(fsStore), {
    put: (k: string, d: Uint8Array | AsyncIterable<Uint8Array>) =>
      (k.endsWith('/data') && ++dataPuts === 2 ? Promise.reject(new Error('injected upload failure')) : fsStore.put(k, d)),
  });
  const engine = await Engine.open({ store: failing, cacheDir });
  const dev = await engine.openDevice(layer, { id: 'points', durable: true });
  say('verified');
  for (const op of POINT_OPS) {
    say(`s ${op.i}`);
    if (op.kind === 'write') await dev.write(op.off, payload(POINTS_SEED, 1, op), { fua: op.fua });
    else if (op.kind === 'zero') await dev.writeZeroes(op.off, op.len);
    else if (op.kind === 'flush') await dev.flush();
    else if (op.kind === 'snapshot') {
      const id = await dev.snapshot().then((s) => s.id, () => null);
      if (!id) continue; // failed (folded back): never acknowledged
      say(`a ${op.i} ${id}`);
      continue;
    }
    say(`a ${op.i}`);
  }
  say('done');
  setInterval(() => {}, 1 << 30); // alive until the parent kills it (a pending promise alone lets the process exit)
})().catch((e) => { say(`error ${String(e?.stack ?? e).replace(/\n/g, ' | ')}`); process.exit(1); });
