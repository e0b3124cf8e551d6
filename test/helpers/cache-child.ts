// Child for the cache persistence tests: reads the first BYTES of a device on
// LAYER through an engine over STORE with cache directory CACHE, waits until
// the cache has journaled what it fetched, says "persisted" and idles until
// it is killed (SIGKILL: nothing is closed).
import { Engine } from '../../src/index';

async function main(): Promise<void> {
  const [store, cacheDir, layer, bytes] = process.argv.slice(2);
  const e = await Engine.open({ store, cacheDir });
  const d = await e.openDevice(layer);
  await d.read(0, Number(bytes));
  await new Promise((r) => setTimeout(r, 800)); // past the cache's persist delay
  process.stdout.write('persisted\n');
  setInterval(() => {}, 1000);
}
main().catch((err) => { console.error(err); process.exit(1); });
