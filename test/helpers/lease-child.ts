// Child for the lease tests: a "host" (engine with leases) that opens a
// device on LAYER over STORE, says "open" and idles until it is killed.
import { Engine } from '../../src/index';

async function main(): Promise<void> {
  const [store, cacheDir, layer, host, ttl] = process.argv.slice(2);
  const e = await Engine.open({ store, cacheDir, profiles: false, leases: { hostId: host, ttlMs: Number(ttl) } });
  await e.openDevice(layer);
  process.stdout.write('open\n');
  setInterval(() => {}, 1000);
}
main().catch((err) => { console.error(err); process.exit(1); });
