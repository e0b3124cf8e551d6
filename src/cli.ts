// `strata` command line: import, export, inspect and list layers.
import { Engine } from './engine';
import { codecName, parseCodec } from './format';
import { progressPrinter } from './progress';
import { StrataError } from './errors';

const USAGE = `usage:
  strata import IMAGE --store STORE [--codec zstd|lz4|none] [--level N]
  strata export LAYER OUT --store STORE
  strata inspect LAYER --store STORE [--json]
  strata layers --store STORE
STORE is a directory or s3://bucket/prefix?endpoint=…&region=…&forcePathStyle=1
(credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the AWS SDK's chain); also $STRATA_STORE.`;

interface Args { _: string[]; [k: string]: string | boolean | string[] }

export function parseArgs(argv: string[]): Args {
  const out: Args = { _: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a.startsWith('--')) {
      // Split at the first '=' only: store URLs carry '=' in their query.
      const eq = a.indexOf('=');
      const [k, v] = eq < 0 ? [a.slice(2), undefined] : [a.slice(2, eq), a.slice(eq + 1)];
      if (v !== undefined) out[k] = v;
      else if (i + 1 < argv.length && !argv[i + 1].startsWith('--') && !['json', 'help'].includes(k)) out[k] = argv[++i];
      else out[k] = true;
    } else out._.push(a);
  }
  return out;
}

export async function main(argv: string[]): Promise<number> {
  const args = parseArgs(argv);
  const [cmd, ...rest] = args._;
  if (!cmd || args.help) { console.log(USAGE); return cmd ? 0 : 2; }
  const store = typeof args.store === 'string' ? args.store : process.env.STRATA_STORE;
  if (!store) { console.error(`strata ${cmd}: --store STORE is required\n${USAGE}`); return 2; }
  let engine: Engine | undefined;
  try {
    engine = await Engine.open({ store });
    switch (cmd) {
      case 'import': {
        if (rest.length !== 1) throw new StrataError('EINVAL', 'import takes one IMAGE');
        const codec = parseCodec(typeof args.codec === 'string' ? args.codec : 'zstd');
        const level = typeof args.level === 'string' ? Number(args.level) : undefined;
        const p = progressPrinter('import');
        const t0 = Date.now();
        const r = await engine.importImage(rest[0], { codec, level, onProgress: p });
        p.end();
        const s = r.stats;
        const secs = (Date.now() - t0) / 1000;
        console.error(`imported ${(r.bytes / 1048576).toFixed(1)} MiB in ${secs.toFixed(2)} s (${(r.bytes / 1e6 / secs).toFixed(0)} MB/s): ` +
          `${s.storedBlocks} blocks stored, ${s.zeroBlocks} zero, ${s.dedupBlocks} deduplicated, ` +
          `${(s.compressedBytes / 1048576).toFixed(1)} MiB compressed (${codecName(r.header.codec)}, ratio ${(s.storedBlocks * 4096 / Math.max(1, s.compressedBytes)).toFixed(2)})`);
        console.log(r.id);
        return 0;
      }
      case 'export': {
        if (rest.length !== 2) throw new StrataError('EINVAL', 'export takes LAYER and OUT');
        const p = progressPrinter('export');
        const r = await engine.exportLayer(rest[0], rest[1], { onProgress: p });
        p.end();
        console.error(`wrote ${r.bytes} bytes to ${rest[1]}`);
        console.log(r.sha256);
        return 0;
      }
      case 'inspect': {
        if (rest.length !== 1) throw new StrataError('EINVAL', 'inspect takes one LAYER');
        const h = await engine.inspect(rest[0]);
        const summary = {
          id: h.chain[0], parent: h.chain[1] ?? null, chain: h.chain, codec: codecName(h.codec), blockSize: h.blockSize,
          virtualSize: h.virtualSize, dataSize: h.dataSize, frames: h.frames.length,
          compressedSize: h.frames.reduce((a, f) => a + f.cSize, 0), extents: h.extents.length,
        };
        if (args.json) console.log(JSON.stringify({ ...summary, mapping: h.extents }, null, 2));
        else for (const [k, v] of Object.entries(summary)) console.log(`${k.padEnd(15)} ${Array.isArray(v) ? v.join(' <- ') : v}`);
        return 0;
      }
      case 'layers': {
        for (const id of await engine.listLayers()) console.log(id);
        return 0;
      }
      default:
        console.error(`strata: unknown command ${cmd}\n${USAGE}`);
        return 2;
    }
  } catch (e) {
    const err = e as StrataError;
    console.error(`strata ${cmd}: ${err.message}`);
    return err.errno ? 1 : 70;
  } finally {
    await engine?.close();
  }
}
