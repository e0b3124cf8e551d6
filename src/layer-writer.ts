// Builds a layer from blocks in a local file (a raw image for import, a
// frozen overlay for a snapshot). Two passes over the source, both in the
// worker pool: (1) fingerprint every candidate block (zero test, xxh64,
// sha-256); then, in device order, zero blocks become zero extents, blocks
// already stored in the chain or earlier in this layer become references
// (dedup), the rest get data offsets; (2) pack the new blocks into frames of
// at most 2 MiB, compress, checksum, and stream them to the object store in
// order. The index and, last, the header are written after the data, so a
// layer is visible only once complete.
import { randomBytes } from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import type { Core } from './core';
import type { LayerRegistry } from './layers';
import { BLOCK_SIZE, Codec, encodeHeader, Extent, Frame, FRAME_MAX, keys, LayerHeader, MAX_CHAIN, validateHeader, ZERO_LAYER } from './format';
import { DedupIndex, encodeIndex, type Fingerprint, type Location } from './fingerprint';
import { DROPPED_LAYER, normalize, overlay, remapForChild, shiftForChild } from './mapping';
import { einval, StrataError } from './errors';
import type { Run } from '../workers/codec-worker';
import { cacheFiles } from './layer-cache';

const BS = BLOCK_SIZE;
const FRAME_BLOCKS = FRAME_MAX / BS;

export interface BlockRun { devBlock: number; count: number; fileBlock: number }
export interface Progress { phase: 'scan' | 'pack' | 'commit' | 'sweep'; done: number; total: number }

export interface WriteLayerInput {
  virtualSize: number;
  parent?: LayerHeader;
  codec: Codec;
  level?: number;
  fd: number;
  /** Blocks whose content comes from `fd` (they may still turn out zero or duplicate). */
  dataRuns: BlockRun[];
  /** Blocks that are zero in the new layer without reading anything. */
  zeroRuns: Array<{ devBlock: number; count: number }>;
  /** Also install the frames into this host's cache for the new layer. */
  seed?: boolean;
  /**
   * Compaction: the parent-chain indexes (in order) the new layer keeps
   * referencing; its chain is [new, ...those]. Every block mapped to a layer
   * left out must be among `dataRuns` (src/compaction.ts puts them there).
   */
  keep?: number[];
  onProgress?: (p: Progress) => void;
}

export interface WriteLayerStats {
  candidateBlocks: number; zeroBlocks: number; dedupBlocks: number; storedBlocks: number;
  compressedBytes: number; frames: number;
}

interface Piece { devBlock: number; count: number; fileBlock: number }

export async function writeLayer(core: Core, registry: LayerRegistry, input: WriteLayerInput): Promise<{ header: LayerHeader; stats: WriteLayerStats }> {
  const { virtualSize, parent } = input;
  if (virtualSize % BS || virtualSize <= 0) throw einval(`virtual size ${virtualSize} is not a positive multiple of ${BS}`);
  if (parent && parent.virtualSize !== virtualSize) throw einval('a layer must have its parent\'s virtual size');
  const keep = parent ? input.keep ?? parent.chain.map((_, i) => i) : [];
  if (parent && keep.length + 1 > MAX_CHAIN) throw einval(`chain would exceed ${MAX_CHAIN} layers`);
  const id = randomBytes(16).toString('hex');
  const kept = parent ? keep.map((i) => parent.chain[i]) : [];
  const chain = [id, ...kept];
  const workers = core.pool.maxThreads;
  const progress = input.onProgress ?? (() => {});

  // ---- pass 1: fingerprints, in chunks of up to one frame of blocks
  const chunks = chunkRuns(input.dataRuns, FRAME_BLOCKS);
  const candidateBlocks = input.dataRuns.reduce((a, r) => a + r.count, 0);
  let scanned = 0;
  const scans = await mapLimit(chunks, workers * 2, async (pieces) => {
    const n = pieces.reduce((a, p) => a + p.count, 0);
    const ptr = core.heap.alloc(n * BS + n * 8 + n + n * 16);
    const hashPtr = ptr + n * BS, zeroPtr = hashPtr + n * 8, shaPtr = zeroPtr + n;
    try {
      await core.run({ op: 'scan', fd: input.fd, runs: toRuns(pieces), ptr, hashPtr, zeroPtr, shaPtr });
      const u8 = core.heap.u8;
      const hv = new DataView(core.heap.buffer, hashPtr, n * 8);
      const zero = u8.slice(zeroPtr, zeroPtr + n);
      const fps: Fingerprint[] = new Array(n);
      const shas = Buffer.from(u8.slice(shaPtr, shaPtr + n * 16));
      for (let i = 0; i < n; i++) fps[i] = { xx: hv.getBigUint64(i * 8, true), sha: shas.subarray(i * 16, i * 16 + 16) };
      scanned += n;
      progress({ phase: 'scan', done: scanned, total: candidateBlocks });
      return { pieces, zero, fps };
    } finally { core.heap.free(ptr); }
  });

  // ---- decide: zero, dedup reference or new data, in device order.
  // The chain is asked only about this layer's non-zero blocks (the index
  // buckets they fall in): the cost follows the change, not the chain.
  const dedup = new DedupIndex(); // this layer's own new blocks
  const inChain = new Map<Fingerprint, Location>();
  if (parent) {
    const asked: Fingerprint[] = [];
    for (const s of scans) s.fps.forEach((fp, k) => { if (!s.zero[k]) asked.push(fp); });
    const found = await registry.lookup(kept, asked);
    asked.forEach((fp, i) => { if (found[i]) inChain.set(fp, found[i]!); });
  }
  const changes: Extent[] = [];
  const push = (dev: number, layer: number, data: number) => {
    const last = changes[changes.length - 1];
    if (last && last.dev + last.len === dev && last.layer === layer && (layer === ZERO_LAYER || last.data + last.len === data)) last.len += BS;
    else changes.push({ dev, len: BS, layer, data: layer === ZERO_LAYER ? 0 : data });
  };
  const stored: number[] = []; // source file block of each new data block, in data order
  const storedFps: Fingerprint[] = [];
  let zeroBlocks = 0, dedupBlocks = 0;
  for (const s of scans) {
    let k = 0;
    for (const p of s.pieces) {
      for (let b = 0; b < p.count; b++, k++) {
        const dev = (p.devBlock + b) * BS;
        if (s.zero[k]) { zeroBlocks++; push(dev, ZERO_LAYER, 0); continue; }
        const hit = inChain.get(s.fps[k]) ?? dedup.find(s.fps[k]);
        if (hit) { dedupBlocks++; push(dev, hit.layer, hit.data); continue; }
        const data = stored.length * BS;
        stored.push(p.fileBlock + b);
        storedFps.push(s.fps[k]);
        dedup.add(s.fps[k], { layer: 0, data });
        push(dev, 0, data);
      }
    }
  }
  for (const z of input.zeroRuns) changes.push({ dev: z.devBlock * BS, len: z.count * BS, layer: ZERO_LAYER, data: 0 });
  changes.sort((a, b) => a.dev - b.dev);
  const base = parent ? (input.keep ? remapForChild(parent.extents, keep) : shiftForChild(parent.extents)) : [{ dev: 0, len: virtualSize, layer: ZERO_LAYER, data: 0 }];
  const extents = normalize(core.heap, overlay(base, normalize(core.heap, changes)));
  const stray = extents.find((e) => e.layer === DROPPED_LAYER);
  if (stray) throw new StrataError('EIO', `compaction left ${stray.dev}+${stray.len} mapped to a dropped layer (a bug: nothing was uploaded)`);
  const dataSize = stored.length * BS;

  // Validate the final shape before uploading anything (H13: never upload a
  // layer whose header cannot be written and read back).
  const frames: Frame[] = [];
  const frameGroups: number[][] = [];
  for (let i = 0; i < stored.length; i += FRAME_BLOCKS) frameGroups.push(stored.slice(i, i + FRAME_BLOCKS));
  const probe: LayerHeader = { flags: 0, blockSize: BS, codec: input.codec, virtualSize, chain, dataSize, extents,
    frames: frameGroups.map((g, i) => ({ u: i * FRAME_MAX, c: i, uSize: g.length * BS, cSize: 1, checksum: 0n })) };
  validateHeader(probe);

  // ---- pass 2: pack frames and stream them out in order
  let seedFd = -1;
  const seedFile = cacheFiles(core.cacheDir, id).data;
  if (input.seed) { seedFd = fs.openSync(seedFile, 'w+', 0o600); fs.ftruncateSync(seedFd, dataSize); }
  let compressedBytes = 0, uPos = 0, cPos = 0, packed = 0;
  const uSums: bigint[] = []; // the seeded cache keeps them to verify its frames in a later process
  const level = input.level ?? 1;
  const cCap = FRAME_MAX + FRAME_MAX / 255 + 65536;
  async function* frameStream(): AsyncGenerator<Uint8Array> {
    const window: Array<Promise<{ bytes: Buffer; checksum: bigint; uSize: number; uSum: bigint }>> = [];
    let next = 0;
    const start = (gi: number) => (async () => {
      const g = frameGroups[gi];
      const n = g.length;
      const ptr = await core.bulk.acquire(n * BS);
      const cPtr = core.heap.alloc(cCap);
      try {
        const r = await core.run<{ cSize: number; checksum: string; uSize: number; uSum: string }>({
          op: 'pack', fd: input.fd, runs: toRuns(g.map((fb) => ({ devBlock: 0, count: 1, fileBlock: fb }))), ptr, cPtr, cCap, codec: input.codec, level });
        const bytes = Buffer.from(core.heap.u8.subarray(cPtr, cPtr + r.cSize));
        if (seedFd >= 0) await core.uring.writeFull(seedFd, gi * FRAME_MAX, r.uSize, ptr);
        return { bytes, checksum: BigInt('0x' + r.checksum), uSize: r.uSize, uSum: BigInt('0x' + r.uSum) };
      } finally { core.bulk.release(ptr); core.heap.free(cPtr); }
    })();
    while (next < frameGroups.length && window.length < workers * 2) window.push(start(next++));
    while (window.length) {
      const f = await window.shift()!;
      if (next < frameGroups.length) window.push(start(next++));
      frames.push({ u: uPos, c: cPos, uSize: f.uSize, cSize: f.bytes.length, checksum: f.checksum });
      uSums.push(f.uSum);
      // Written through to the shared tier as it is produced.
      core.tier2?.put(id, { c: cPos, cSize: f.bytes.length }, f.bytes);
      uPos += f.uSize; cPos += f.bytes.length; compressedBytes += f.bytes.length;
      packed += f.uSize / BS;
      progress({ phase: 'pack', done: packed, total: stored.length });
      yield f.bytes;
    }
  }
  const header: LayerHeader = { flags: 0, blockSize: BS, codec: input.codec, virtualSize, chain, dataSize, extents, frames };
  try {
    await core.store.put(keys.data(id), frameStream());
    await core.store.put(keys.index(id), encodeIndex(storedFps, (b) => core.checksum(b)));
    progress({ phase: 'commit', done: 0, total: 1 });
    await core.store.put(keys.header(id), encodeHeader(header, (b) => core.checksum(b)));
  } catch (e) {
    await Promise.allSettled([core.store.delete(keys.data(id)), core.store.delete(keys.index(id))]);
    // Frames written through to the shared tier belong to a layer that never was.
    if (core.tier2) { await core.tier2.idle(); fs.rmSync(path.join(core.tier2.root, id), { recursive: true, force: true }); }
    if (seedFd >= 0) { fs.closeSync(seedFd); fs.rmSync(seedFile, { force: true }); }
    throw e;
  }
  if (seedFd >= 0) fs.closeSync(seedFd);
  // A layer that stores nothing (only zeroes and references) needs no cache:
  // nothing would ever read it, or release it.
  if (seedFd >= 0 && frames.length) registry.adoptSeeded(header, uSums);
  else { if (seedFd >= 0) fs.rmSync(seedFile, { force: true }); registry.remember(header); }
  return { header, stats: { candidateBlocks, zeroBlocks, dedupBlocks, storedBlocks: stored.length, compressedBytes, frames: frames.length } };
}

/** Splits runs into chunks of at most `max` blocks, keeping device order. */
function chunkRuns(runs: BlockRun[], max: number): Piece[][] {
  const out: Piece[][] = [];
  let cur: Piece[] = [], n = 0;
  for (const r of runs) {
    let done = 0;
    while (done < r.count) {
      const take = Math.min(r.count - done, max - n);
      cur.push({ devBlock: r.devBlock + done, count: take, fileBlock: r.fileBlock + done });
      done += take; n += take;
      if (n === max) { out.push(cur); cur = []; n = 0; }
    }
  }
  if (n) out.push(cur);
  return out;
}

/** File runs for a worker, merging file-contiguous pieces. */
function toRuns(pieces: Piece[]): Run[] {
  const runs: Run[] = [];
  for (const p of pieces) {
    const last = runs[runs.length - 1];
    if (last && last.fileOffset + last.blocks * BS === p.fileBlock * BS) last.blocks += p.count;
    else runs.push({ fileOffset: p.fileBlock * BS, blocks: p.count });
  }
  return runs;
}

/** Like Promise.all over fn(items) with at most `limit` running; results in order. */
export async function mapLimit<T, R>(items: T[], limit: number, fn: (t: T, i: number) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  const worker = async () => { while (next < items.length) { const i = next++; out[i] = await fn(items[i], i); } };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}
