// Chains without walls: a device snapshotted every minute would otherwise
// grow its chain by one layer a minute, into the format's limits (4096
// layers) and a layer cache per ancestor. When a snapshot's chain would
// exceed `maxChain` layers, it is compacted: it keeps referencing only the
// chain's root (the template) and the layers that hold much of the device
// (≥ 64 MiB mapped, the largest first, at most half of maxChain), and stores
// itself the blocks still mapped to the other layers — read through the
// device's current view and written into the frozen overlay file before the
// upload (they hold the bytes the device reads there, so a crash that turns
// them into overlay data changes nothing a reader sees). The dropped layers
// are then referenced by nothing newer: they can be deleted and collected.
import type { Core } from './core';
import type { LayerCache } from './layer-cache';
import { BLOCK_SIZE, ZERO_LAYER, type LayerHeader } from './format';
import type { BlockRun } from './layer-writer';
import { S } from './wasm';

/** Default chain length at which a snapshot compacts. */
export const MAX_CHAIN_DEFAULT = 32;
/** A layer mapping at least this many bytes of the device is kept rather than copied. */
export const KEEP_BYTES = 64 << 20;

/** The parent-chain indexes a compacted child keeps, or null when no compaction is due. */
export function compactionPlan(parent: LayerHeader, maxChain: number): number[] | null {
  if (parent.chain.length + 1 <= maxChain) return null;
  const mapped = new Map<number, number>();
  for (const e of parent.extents) if (e.layer !== ZERO_LAYER) mapped.set(e.layer, (mapped.get(e.layer) ?? 0) + e.len);
  const root = parent.chain.length - 1;
  const big = [...mapped].filter(([i, n]) => i !== root && n >= KEEP_BYTES).sort((a, b) => b[1] - a[1])
    .slice(0, Math.max(0, Math.floor(maxChain / 2) - 1)).map(([i]) => i);
  return [...big, root].sort((a, b) => a - b);
}

/**
 * Copies the blocks the compacted child must store itself — mapped to a
 * dropped layer and not changed in the overlay (`table`: its block states) —
 * from the layer caches into the overlay file, and returns them as runs.
 */
export async function copyUp(core: Core, parent: LayerHeader, caches: Map<number, LayerCache>, keep: readonly number[],
  table: number, fd: number): Promise<BlockRun[]> {
  const kept = new Set(keep);
  const w = core.heap.wasm;
  const runs: BlockRun[] = [];
  const CH = 1 << 20;
  const buf = await core.bulk.acquire(CH);
  try {
    for (const e of parent.extents) {
      if (e.layer === ZERO_LAYER || kept.has(e.layer)) continue;
      const cache = caches.get(e.layer)!;
      const b0 = e.dev / BLOCK_SIZE, b1 = (e.dev + e.len) / BLOCK_SIZE;
      for (let b = b0; b < b1;) {
        // A run of blocks the overlay did not change (those it did are stored anyway).
        const st = w.stateGet(table, b);
        if (st === S.DIRTY || st === S.ZERO) { b++; continue; }
        let end = b + 1;
        while (end < b1 && end - b < CH / BLOCK_SIZE) {
          const s2 = w.stateGet(table, end);
          if (s2 === S.DIRTY || s2 === S.ZERO) break;
          end++;
        }
        const len = (end - b) * BLOCK_SIZE, dev = b * BLOCK_SIZE;
        await cache.read(e.data + (dev - e.dev), len, buf);
        await core.uring.writeFull(fd, dev, len, buf);
        const last = runs[runs.length - 1];
        if (last && last.devBlock + last.count === b) last.count += end - b;
        else runs.push({ devBlock: b, count: end - b, fileBlock: b });
        b = end;
      }
    }
  } finally { core.bulk.release(buf); }
  return runs;
}
