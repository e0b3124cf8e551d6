// One life of the device under the crash harness (test/crash/harness.ts):
// resumes the durable device (or creates it), reports every block of it and
// of every snapshot layer it has not reported before, then drives the seeded
// op stream through the engine API, reporting each start and ack on stdout,
// until the parent kills it.
import { Engine } from '../../src/index';
import { blockHashes, deviceTarget, drive, opStream } from './model';

export interface ChildArgs {
  store: string; cacheDir: string; layer: string; id: string;
  seed: number; epoch: number; count: number; window: number; known: string[];
}

// The parent kills this process: a write to its closed pipe must not be the failure.
process.stdout.on('error', () => {});
const say = (line: string) => process.stdout.write(`${line}\n`);

(async () => {
  const a: ChildArgs = JSON.parse(process.argv[2]);
  say(`pid ${process.pid}`);
  // A short chain limit: snapshots compact (copy blocks into the frozen overlay) under the kills too.
  const engine = await Engine.open({ store: a.store, cacheDir: a.cacheDir, maxChain: 4 });
  const dev = engine.savedDevices().includes(a.id) ? await engine.resumeDevice(a.id) : await engine.openDevice(a.layer, { id: a.id, durable: true });
  say(`dev ${blockHashes(await dev.read(0, dev.size)).join(',')}`);
  const known = new Set([a.layer, ...a.known]);
  for (const id of await engine.listLayers()) {
    if (known.has(id)) continue;
    const snap = await engine.openDevice(id);
    say(`layer ${id} ${blockHashes(await snap.read(0, snap.size)).join(',')}`);
    await engine.closeDevice(snap);
  }
  say('verified');
  await drive(deviceTarget(dev), a.seed, a.epoch, opStream(a.seed, a.epoch, dev.blocks, a.count), a.window, {
    start: (op) => say(`s ${op.i}`),
    ack: (op, snap) => say(`a ${op.i}${snap ? ` ${snap}` : ''}`),
  });
  say('done');
  setInterval(() => {}, 1 << 30); // alive until the parent kills it (a pending promise alone lets the process exit)
})().catch((e) => { say(`error ${String(e?.stack ?? e).replace(/\n/g, ' | ')}`); process.exit(1); });
