// `strata` command line. Layer commands work on an object store directly
// (--store); device and snapshot commands talk to a running daemon (--api).
import * as path from 'path';
import { Engine } from './engine';
import { codecName, parseCodec } from './format';
import { progressPrinter } from './progress';
import { StrataError } from './errors';
import { ApiClient } from './api/client';
import { dedupReport, formatDedupReport } from './dedup-report';

const USAGE = `usage:
  strata import IMAGE --store STORE [--codec zstd|lz4|none] [--level N]
  strata export LAYER OUT --store STORE
  strata inspect LAYER --store STORE [--json]
  strata layers --store STORE
  strata dedup-report LAYER... --store STORE [--json]  how much block dedup at 4/16/64/128 KiB would save
  strata gc --store STORE [--apply] [--grace 24h] [--shared-cache DIR] [--json]
                                                       objects nothing references (failed uploads, unfinished deletes,
                                                       run-out leases, shared-tier leftovers) older than the grace
                                                       period: a report (dry run) unless --apply
  strata devices [--api SOCKET|URL] [--json]           devices of a running daemon
  strata snapshots [--api SOCKET|URL] [--json]         snapshots in the daemon's store
  strata snapshot DEVICE [--api SOCKET|URL]            snapshot a device (waits, shows progress; prints the layer id)
STORE is a directory or s3://bucket/prefix?endpoint=…&region=…&forcePathStyle=1
(credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the AWS SDK's chain); also $STRATA_STORE.
--api defaults to $STRATA_API or ./strata-data/api.sock; --token to $STRATA_API_TOKEN.`;

const DAEMON_COMMANDS = new Set(['devices', 'snapshots', 'snapshot']);

interface Args { _: string[]; [k: string]: string | boolean | string[] }

async function daemonCommand(cmd: string, rest: string[], args: Args): Promise<number> {
  const target = typeof args.api === 'string' ? args.api : process.env.STRATA_API ?? path.join('strata-data', 'api.sock');
  const token = typeof args.token === 'string' ? args.token : process.env.STRATA_API_TOKEN;
  const api = new ApiClient(target, token);
  try {
    switch (cmd) {
      case 'devices': {
        const list = await api.request<Array<{ id: string; layer: string; frontend: string; size: number; path: string | null; nbd: { uri: string } }>>('GET', '/v1/devices');
        if (args.json) console.log(JSON.stringify(list, null, 2));
        else for (const d of list) console.log(`${d.id.padEnd(20)} ${d.frontend.padEnd(5)} ${d.layer} ${(d.size / 1048576).toFixed(0)} MiB  ${d.path ?? d.nbd.uri}`);
        return 0;
      }
      case 'snapshots': {
        const list = await api.request<Array<{ id: string; parent: string; size: number }>>('GET', '/v1/snapshots');
        if (args.json) console.log(JSON.stringify(list, null, 2));
        else for (const l of list) console.log(`${l.id} <- ${l.parent}`);
        return 0;
      }
      case 'snapshot': {
        if (rest.length !== 1) throw new StrataError('EINVAL', 'snapshot takes one DEVICE');
        let op = await api.request<{ id: string; state: string; progress: { phase: 'scan' | 'pack' | 'commit'; done: number; total: number }; result?: { snapshot: { id: string } }; error?: { message: string } }>(
          'POST', `/v1/devices/${encodeURIComponent(rest[0])}/snapshots`);
        const p = progressPrinter('snapshot');
        while (op.state === 'running') {
          await new Promise((r) => setTimeout(r, 100));
          op = await api.request('GET', `/v1/operations/${op.id}`);
          if (op.progress.total) p(op.progress);
        }
        p.end();
        if (op.state !== 'succeeded') throw new StrataError('EIO', `snapshot failed: ${op.error?.message ?? 'unknown error'}`);
        console.log(op.result!.snapshot.id);
        return 0;
      }
    }
    return 2;
  } catch (e) {
    const err = e as StrataError;
    console.error(`strata ${cmd}: ${err.message}`);
    return err.errno ? 1 : 70;
  }
}

/** "90s", "30m", "24h", "7d" (or plain seconds) in ms. */
export function parseDuration(s: string): number {
  const m = /^(\d+)(s|m|h|d)?$/.exec(s);
  if (!m) throw new StrataError('EINVAL', `bad duration ${JSON.stringify(s)} (e.g. 90m, 24h, 7d)`);
  return Number(m[1]) * { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[(m[2] ?? 's') as 's' | 'm' | 'h' | 'd'];
}

export function parseArgs(argv: string[]): Args {
  const out: Args = { _: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a.startsWith('--')) {
      // Split at the first '=' only: store URLs carry '=' in their query.
      const eq = a.indexOf('=');
      const [k, v] = eq < 0 ? [a.slice(2), undefined] : [a.slice(2, eq), a.slice(eq + 1)];
      if (v !== undefined) out[k] = v;
      else if (i + 1 < argv.length && !argv[i + 1].startsWith('--') && !['json', 'help', 'insecure-nbd', 'tls-verify-peer', 'apply'].includes(k)) out[k] = argv[++i];
      else out[k] = true;
    } else out._.push(a);
  }
  return out;
}

export async function main(argv: string[]): Promise<number> {
  const args = parseArgs(argv);
  const [cmd, ...rest] = args._;
  if (!cmd || args.help) { console.log(USAGE); return cmd ? 0 : 2; }
  if (DAEMON_COMMANDS.has(cmd)) return daemonCommand(cmd, rest, args);
  const store = typeof args.store === 'string' ? args.store : process.env.STRATA_STORE;
  if (!store) { console.error(`strata ${cmd}: --store STORE is required\n${USAGE}`); return 2; }
  let engine: Engine | undefined;
  try {
    engine = await Engine.open({ store, profiles: false, sharedCacheDir: typeof args['shared-cache'] === 'string' ? args['shared-cache'] : undefined });
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
      case 'dedup-report': {
        if (rest.length === 0) throw new StrataError('EINVAL', 'dedup-report takes one or more LAYERs');
        const p = progressPrinter('dedup-report');
        const r = await dedupReport(engine, rest, p);
        p.end();
        console.log(args.json ? JSON.stringify(r, null, 2) : formatDedupReport(r));
        return 0;
      }
      case 'gc': {
        const graceMs = parseDuration(typeof args.grace === 'string' ? args.grace : '24h');
        const p = progressPrinter('gc', 1);
        const r = await engine.gc({ dryRun: !args.apply, graceMs, onProgress: p, onWarning: (m, f) => console.error(`warning: ${m} ${JSON.stringify(f)}`) });
        p.end();
        if (args.json) { console.log(JSON.stringify(r, null, 2)); return 0; }
        const byReason = new Map<string, { n: number; bytes: number }>();
        for (const i of r.removed) {
          const x = byReason.get(i.reason) ?? { n: 0, bytes: 0 };
          x.n++; x.bytes += i.bytes;
          byReason.set(i.reason, x);
        }
        const mib = (b: number) => `${(b / 1048576).toFixed(1)} MiB`;
        console.log(`${r.dryRun ? 'dry run (--apply removes them): would remove' : 'removed'} ${r.removed.length} objects, ${mib(r.bytes)}; ` +
          `${r.layers} layers and ${r.leases} leases seen; grace period ${(r.graceMs / 3_600_000).toFixed(1)} h`);
        for (const [reason, x] of byReason) console.log(`  ${String(x.n).padStart(6)}  ${mib(x.bytes).padStart(12)}  ${reason}`);
        for (const k of r.kept) console.log(`  kept ${k.layer}: ${k.reason}`);
        for (const i of r.removed.slice(0, 50)) console.log(`  ${i.key}`);
        if (r.removed.length > 50) console.log(`  ... and ${r.removed.length - 50} more (--json lists them all)`);
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
