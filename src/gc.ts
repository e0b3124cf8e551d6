// Garbage collection of a store shared by many hosts (docs/architecture.md,
// "Many hosts"). Only objects nothing can reference are removed, and only
// once older than a grace period longer than any upload:
//   - objects of a layer with no header (an upload that failed, or a delete
//     that crashed after the header went) — unless any of its objects is
//     younger than the grace period (an upload may be under way) or a live
//     lease names it;
//   - tombstones of deletes that crashed before removing the header;
//   - leases that ran out more than the grace period ago;
//   - the shared frame tier's directories of such layers;
//   - the filesystem store's temporary files of puts that never finished.
// A layer with a header is never touched: deleting one is a user's decision
// (`deleteLayer`, which checks every host's leases). GC stops, deleting
// nothing more, at the first store error.
import * as fs from 'fs';
import * as path from 'path';
import { ID_RE, keys } from './format';
import { readLeases, TOMBSTONE_MS } from './leases';
import type { ObjectInfo, ObjectStore } from './store/types';
import type { Progress } from './layer-writer';

export interface GcOptions {
  /** Only objects older than this are removed (default 24 h; never under 10 minutes). */
  graceMs?: number;
  /** Report what would go, remove nothing (default true). */
  dryRun?: boolean;
  /** The shared frame tier directory to clean too. */
  sharedTierDir?: string;
  onProgress?: (p: Progress) => void;
  onWarning?: (msg: string, fields: Record<string, unknown>) => void;
}

export interface GcItem { key: string; bytes: number; reason: string }
export interface GcReport {
  dryRun: boolean; graceMs: number;
  layers: number; leases: number;
  /** What was (or, in a dry run, would be) removed. */
  removed: GcItem[];
  bytes: number;
  /** Layers without a header kept because something of them is recent or leased. */
  kept: Array<{ layer: string; reason: string }>;
}

export const MIN_GRACE_MS = 10 * 60_000;

export async function collectGarbage(store: ObjectStore, opts: GcOptions = {}): Promise<GcReport> {
  const graceMs = Math.max(MIN_GRACE_MS, opts.graceMs ?? 24 * 3_600_000);
  const dryRun = opts.dryRun ?? true;
  const now = Date.now();
  const old = (o: { modified?: number }) => o.modified !== undefined && now - o.modified > graceMs;
  const report: GcReport = { dryRun, graceMs, layers: 0, leases: 0, removed: [], bytes: 0, kept: [] };
  const progress = (phase: Progress['phase'], done: number, total: number) => opts.onProgress?.({ phase, done, total });

  // Mark: every layer's objects, and the layers a live lease names.
  progress('scan', 0, 1);
  const byLayer = new Map<string, ObjectInfo[]>();
  for (const o of await store.list('layers/')) {
    const id = o.key.split('/')[1];
    if (!ID_RE.test(id)) continue; // not ours: left alone
    byLayer.set(id, [...(byLayer.get(id) ?? []), o]);
  }
  const leased = new Set<string>();
  const expired: ObjectInfo[] = [];
  for (const { lease: l, info } of await readLeases(store, opts.onWarning)) {
    report.leases++;
    if (l.written + l.ttlMs > now) for (const id of l.layers) leased.add(id);
    else if (now - (l.written + l.ttlMs) > graceMs) expired.push(info);
  }
  report.layers = byLayer.size;

  const doomed: GcItem[] = [];
  for (const [id, objs] of byLayer) {
    const header = objs.find((o) => o.key === keys.header(id));
    if (header) {
      const t = objs.find((o) => o.key === `layers/${id}/tombstone`);
      if (t && t.modified !== undefined && now - t.modified > Math.max(TOMBSTONE_MS, graceMs)) doomed.push({ key: t.key, bytes: t.size, reason: 'tombstone of a delete that did not finish' });
      continue;
    }
    if (leased.has(id)) { report.kept.push({ layer: id, reason: 'named by a live lease' }); continue; }
    if (!objs.every(old)) { report.kept.push({ layer: id, reason: 'has objects younger than the grace period (an upload may be under way)' }); continue; }
    for (const o of objs) doomed.push({ key: o.key, bytes: o.size, reason: 'layer without a header (failed upload or unfinished delete)' });
  }
  for (const o of expired) doomed.push({ key: o.key, bytes: o.size, reason: 'lease that ran out' });
  progress('scan', 1, 1);

  // Sweep, in order; the first error stops it.
  let done = 0;
  for (const item of doomed) {
    if (!dryRun) await store.delete(item.key);
    report.removed.push(item);
    report.bytes += item.bytes;
    progress('sweep', ++done, doomed.length);
  }
  const headerless = new Set([...byLayer].filter(([id, objs]) => !objs.some((o) => o.key === keys.header(id))).map(([id]) => id));
  if (opts.sharedTierDir) sweepTier(opts.sharedTierDir, (id) => !byLayer.has(id) || (headerless.has(id) && !leased.has(id)), now, graceMs, dryRun, report);
  const tmp = (store as { sweepTemporary?: (olderThanMs: number, dryRun: boolean) => GcItem[] }).sweepTemporary;
  if (tmp) for (const item of tmp.call(store, graceMs, dryRun)) { report.removed.push(item); report.bytes += item.bytes; }
  return report;
}

/** The shared tier's `<layer>/` directories of layers that are gone (not touched for the grace period). */
function sweepTier(root: string, gone: (id: string) => boolean, now: number, graceMs: number, dryRun: boolean, report: GcReport): void {
  let names: string[] = [];
  try { names = fs.readdirSync(root); } catch { return; }
  for (const id of names) {
    if (!ID_RE.test(id) || !gone(id)) continue;
    const dir = path.join(root, id);
    let bytes = 0, newest = 0;
    try {
      for (const f of fs.readdirSync(dir)) {
        const st = fs.statSync(path.join(dir, f));
        bytes += st.size;
        newest = Math.max(newest, st.mtimeMs);
      }
      newest = Math.max(newest, fs.statSync(dir).mtimeMs);
    } catch { continue; }
    if (now - newest <= graceMs) continue;
    if (!dryRun) fs.rmSync(dir, { recursive: true, force: true });
    report.removed.push({ key: `shared tier: ${id}/`, bytes, reason: 'frames of a layer that is gone' });
    report.bytes += bytes;
  }
}
