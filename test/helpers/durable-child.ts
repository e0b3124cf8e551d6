// Child process for test/durable.test.ts: opens a durable device, applies
// the writes it is told, reports each acknowledged one, then (optionally)
// starts a snapshot whose upload never finishes, and waits to be killed.
import { Engine } from '../../src/index';
import { FsObjectStore } from '../../src/store/fs';
import type { ObjectStore } from '../../src/store/types';

// The parent kills this process: a write to its closed pipe must not be the failure.
process.stdout.on('error', () => {});

(async () => {
  const [store, cacheDir, layer, id, mode] = process.argv.slice(2);
  const fsStore = new FsObjectStore(store);
  // With mode "hang-upload", data puts never complete: the snapshot stays frozen.
  const hanging: ObjectStore = {
    put: (k, d) => (mode === 'hang-upload' && k.endsWith('/data') ? new Promise(() => {}) : fsStore.put(k, d)),
    get: (k, r) => fsStore.get(k, r), head: (k) => fsStore.head(k), list: (p) => fsStore.list(p), delete: (k) => fsStore.delete(k),
  };
  const engine = await Engine.open({ store: hanging, cacheDir });
  const dev = await engine.openDevice(layer, { id, durable: true });
  const B = 4096;
  for (let i = 0; i < 64; i++) {
    await dev.write(i * 3 * B, Buffer.alloc(B, i + 1));
    process.stdout.write(`acked write ${i}\n`);
  }
  await dev.writeZeroes(10 * B, 6 * B);                 // zero blocks 10..15 (some were written)
  process.stdout.write('acked zero\n');
  await dev.write(12 * B + 512, Buffer.alloc(1024, 0xee)); // partial write into a zeroed block
  process.stdout.write('acked partial\n');
  if (mode === 'hang-upload') {
    void dev.snapshot();
    await new Promise((r) => setTimeout(r, 300)); // frozen, upload hanging
    await dev.write(0, Buffer.alloc(B, 0x77));     // a write after the freeze
    process.stdout.write('acked after-freeze\n');
  }
  process.stdout.write('ready\n');
  setInterval(() => {}, 1 << 30); // alive until the parent kills it (a pending promise alone lets the process exit)
})();
