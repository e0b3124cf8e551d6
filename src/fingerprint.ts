// Block fingerprints for dedup: xxh64 (WASM, fast) finds candidates, a
// 128-bit SHA-256 prefix confirms them, so two blocks are only ever treated as
// one when both agree. Each layer stores the fingerprints of its own stored
// blocks in its index object (format in docs/format.md): version 2 is sorted
// by xxh64 and split into buckets by the hash's top bits, with a checksummed
// directory of bucket offsets and checksums, so a snapshot looks up only the
// buckets its changed blocks fall in — its cost follows the change, not the
// size of the layers below it. Version 1 (data order, one checksum) is still
// read.
import * as fs from 'fs';
import { ebadmsg } from './errors';
import type { ObjectStore } from './store/types';

export interface Fingerprint { xx: bigint; sha: Buffer }
export interface Location { layer: number; data: number }

const MAGIC = Buffer.from('STRATAIX', 'ascii');
const V1_ENTRY = 24;
const V2_HEAD = 24; // magic 8, version 4, count 4, bucket bits 4, reserved 4
const DIR_ENTRY = 12; // first entry u32, bucket checksum u64
export const V2_ENTRY = 32; // xxh64 u64, sha-256 prefix 16, data block u32, reserved u32
const RUN_BYTES = 1 << 20; // most index bytes one read brings in
const GAP_BYTES = 16 << 10; // unasked-for bytes a read may span to join two runs

/** Bucket bits for n entries: about 64 entries a bucket, at least 2^4 buckets, at most 2^22. */
export const bucketBits = (n: number) => Math.min(22, Math.max(4, Math.ceil(Math.log2(Math.max(1, n) / 64))));
const bucketOf = (xx: bigint, bits: number) => Number(xx >> BigInt(64 - bits));

/** Version 2 index of a layer's stored blocks (`fps[i]` is data block i). */
export function encodeIndex(fps: Fingerprint[], checksum: (b: Buffer) => bigint): Buffer {
  const n = fps.length, bits = bucketBits(n), nb = 1 << bits;
  const order = fps.map((_, i) => i).sort((a, b) => (fps[a].xx < fps[b].xx ? -1 : fps[a].xx > fps[b].xx ? 1 : a - b));
  const dirEnd = V2_HEAD + nb * DIR_ENTRY;
  const b = Buffer.alloc(dirEnd + 8 + n * V2_ENTRY);
  MAGIC.copy(b, 0);
  b.writeUInt32LE(2, 8);
  b.writeUInt32LE(n, 12);
  b.writeUInt32LE(bits, 16);
  const entries = dirEnd + 8;
  order.forEach((i, k) => {
    const o = entries + k * V2_ENTRY;
    b.writeBigUInt64LE(fps[i].xx, o);
    fps[i].sha.copy(b, o + 8, 0, 16);
    b.writeUInt32LE(i, o + 24);
  });
  let k = 0;
  for (let bucket = 0; bucket < nb; bucket++) {
    const start = k;
    while (k < n && bucketOf(fps[order[k]].xx, bits) === bucket) k++;
    b.writeUInt32LE(start, V2_HEAD + bucket * DIR_ENTRY);
    b.writeBigUInt64LE(checksum(b.subarray(entries + start * V2_ENTRY, entries + k * V2_ENTRY)), V2_HEAD + bucket * DIR_ENTRY + 4);
  }
  b.writeBigUInt64LE(checksum(b.subarray(0, dirEnd)), dirEnd);
  return b;
}

/** Version 1 (data order), as layers written before version 2 have it. */
export function encodeIndexV1(fps: Fingerprint[], checksum: (b: Buffer) => bigint): Buffer {
  const b = Buffer.alloc(16 + fps.length * V1_ENTRY + 8);
  MAGIC.copy(b, 0);
  b.writeUInt32LE(1, 8);
  b.writeUInt32LE(fps.length, 12);
  fps.forEach((f, i) => { b.writeBigUInt64LE(f.xx, 16 + i * V1_ENTRY); f.sha.copy(b, 24 + i * V1_ENTRY, 0, 16); });
  const end = 16 + fps.length * V1_ENTRY;
  b.writeBigUInt64LE(checksum(b.subarray(0, end)), end);
  return b;
}

function decodeV1(b: Buffer, checksum: (b: Buffer) => bigint, id: string): Fingerprint[] {
  const n = b.readUInt32LE(12);
  const end = 16 + n * V1_ENTRY;
  if (b.length !== end + 8) throw ebadmsg(`layer ${id} index: bad length`);
  if (b.readBigUInt64LE(end) !== checksum(b.subarray(0, end))) throw ebadmsg(`layer ${id} index: checksum mismatch`);
  const out: Fingerprint[] = new Array(n);
  for (let i = 0; i < n; i++) out[i] = { xx: b.readBigUInt64LE(16 + i * V1_ENTRY), sha: b.subarray(24 + i * V1_ENTRY, 40 + i * V1_ENTRY) };
  return out;
}

/** Where an index's bytes come from: the store (ranged gets) or a local copy of the whole object. */
interface Source { read(offset: number, length: number): Promise<Buffer> }

/**
 * Lookups in one layer's index with bounded memory: version 2 keeps only its
 * directory (12 bytes a bucket, ~64 entries a bucket) and reads the buckets
 * a lookup needs, verifying each against its checksum; version 1 indexes
 * are read whole (the layers written before version 2).
 */
export class LayerIndex {
  private constructor(readonly id: string, private src: Source, readonly count: number, private readonly bits: number,
    private readonly dir: Buffer | null, private readonly v1: Map<bigint, Array<{ sha: Buffer; block: number }>> | null,
    private readonly checksum: (b: Buffer) => bigint, private readonly size: number) {}

  static async open(store: ObjectStore, key: string, id: string, checksum: (b: Buffer) => bigint): Promise<LayerIndex> {
    const head = await store.head(key);
    if (!head) throw ebadmsg(`layer ${id} index: missing`);
    const first = await store.get(key, { offset: 0, length: Math.min(head.size, V2_HEAD) });
    if (first.length < 16 || !first.subarray(0, 8).equals(MAGIC)) throw ebadmsg(`layer ${id} index: wrong magic or truncated`);
    const version = first.readUInt32LE(8), n = first.readUInt32LE(12);
    const fromStore: Source = { read: (offset, length) => store.get(key, { offset, length }) };
    if (version === 1) {
      const fps = decodeV1(await store.get(key), checksum, id);
      const map = new Map<bigint, Array<{ sha: Buffer; block: number }>>();
      fps.forEach((f, i) => { const l = map.get(f.xx); if (l) l.push({ sha: f.sha, block: i }); else map.set(f.xx, [{ sha: f.sha, block: i }]); });
      return new LayerIndex(id, fromStore, n, 0, null, map, checksum, head.size);
    }
    if (version !== 2 || first.length < V2_HEAD) throw ebadmsg(`layer ${id} index: unsupported version ${version}`);
    const bits = first.readUInt32LE(16);
    if (bits < 1 || bits > 24) throw ebadmsg(`layer ${id} index: bucket bits ${bits}`);
    const dirEnd = V2_HEAD + (1 << bits) * DIR_ENTRY;
    if (head.size !== dirEnd + 8 + n * V2_ENTRY) throw ebadmsg(`layer ${id} index: ${head.size} bytes do not hold ${n} entries in ${1 << bits} buckets`);
    const dir = await store.get(key, { offset: 0, length: dirEnd + 8 });
    if (dir.readBigUInt64LE(dirEnd) !== checksum(dir.subarray(0, dirEnd))) throw ebadmsg(`layer ${id} index: directory checksum mismatch`);
    return new LayerIndex(id, fromStore, n, bits, dir, null, checksum, head.size);
  }

  /** Bytes of the whole index object. */
  get bytes(): number { return this.size; }
  /** Bytes this index holds in memory. */
  get memoryBytes(): number { return this.dir ? this.dir.length : this.count * 48; }

  /** Reads from a local copy of the whole object from now on (one the caller downloaded and verified as this object). */
  useLocalCopy(file: string): void {
    this.src = {
      read: async (offset, length) => {
        const b = Buffer.allocUnsafe(length);
        const fd = await fs.promises.open(file, 'r');
        try { const { bytesRead } = await fd.read(b, 0, length, offset); if (bytesRead !== length) throw ebadmsg(`layer ${this.id} index copy ${file}: short read`); } finally { await fd.close(); }
        return b;
      },
    };
  }

  /** How many distinct buckets `fps` fall in (a caller decides between ranged reads and the whole object). */
  bucketsFor(fps: Fingerprint[]): number {
    if (!this.dir) return 0;
    return new Set(fps.map((f) => bucketOf(f.xx, this.bits))).size;
  }

  /** For each fingerprint, the data block of this layer holding the same bytes, or -1. */
  async lookup(fps: Fingerprint[]): Promise<Int32Array> {
    const out = new Int32Array(fps.length).fill(-1);
    if (this.v1) {
      fps.forEach((f, i) => { const c = this.v1!.get(f.xx)?.find((e) => e.sha.equals(f.sha)); if (c) out[i] = c.block; });
      return out;
    }
    const dir = this.dir!, nb = 1 << this.bits, entries = V2_HEAD + nb * DIR_ENTRY + 8;
    const start = (b: number) => (b < nb ? dir.readUInt32LE(V2_HEAD + b * DIR_ENTRY) : this.count);
    const byBucket = new Map<number, number[]>();
    fps.forEach((f, i) => { const b = bucketOf(f.xx, this.bits); const l = byBucket.get(b); if (l) l.push(i); else byBucket.set(b, [i]); });
    // Nearby buckets are read together — one request per run of up to 1 MiB,
    // skipping gaps of up to 16 KiB, a few runs at a time (bounded memory).
    const buckets = [...byBucket.keys()].sort((a, b) => a - b).filter((b) => start(b + 1) > start(b));
    const runs: Array<[number, number]> = [];
    for (const b of buckets) {
      const last = runs[runs.length - 1];
      if (last && (start(b) - start(last[1] + 1)) * V2_ENTRY <= GAP_BYTES && (start(b + 1) - start(last[0])) * V2_ENTRY <= RUN_BYTES) last[1] = b;
      else runs.push([b, b]);
    }
    // xxh64 halves as numbers: the scan compares 32-bit words, not BigInts.
    const lo = fps.map((f) => Number(f.xx & 0xffffffffn)), hi = fps.map((f) => Number(f.xx >> 32n));
    let next = 0;
    const worker = async () => {
      while (next < runs.length) {
        const [b0, b1] = runs[next++];
        const first = start(b0), end = start(b1 + 1);
        const bytes = await this.src.read(entries + first * V2_ENTRY, (end - first) * V2_ENTRY);
        for (let b = b0; b <= b1; b++) {
          if (!byBucket.has(b)) continue; // read only because it sits between two that are asked about
          const s = (start(b) - first) * V2_ENTRY, e = (start(b + 1) - first) * V2_ENTRY;
          const part = bytes.subarray(s, e);
          if (dir.readBigUInt64LE(V2_HEAD + b * DIR_ENTRY + 4) !== this.checksum(part)) throw ebadmsg(`layer ${this.id} index: bucket ${b} checksum mismatch`);
          for (const i of byBucket.get(b)!) {
            const sha = fps[i].sha;
            for (let o = 0; o < part.length; o += V2_ENTRY) {
              if (part.readUInt32LE(o) === lo[i] && part.readUInt32LE(o + 4) === hi[i] && part.compare(sha, 0, 16, o + 8, o + 24) === 0) { out[i] = part.readUInt32LE(o + 24); break; }
            }
          }
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(4, runs.length) }, worker));
    return out;
  }
}

/** Candidate map xxh64 → locations, confirmed by the sha prefix on lookup (a new layer's own blocks). */
export class DedupIndex {
  private map = new Map<bigint, Array<{ sha: Buffer; loc: Location }>>();
  size = 0;

  add(fp: Fingerprint, loc: Location): void {
    const list = this.map.get(fp.xx);
    if (!list) this.map.set(fp.xx, [{ sha: fp.sha, loc }]);
    else if (!list.some((c) => c.sha.equals(fp.sha))) list.push({ sha: fp.sha, loc });
    else return;
    this.size++;
  }

  find(fp: Fingerprint): Location | undefined {
    const list = this.map.get(fp.xx);
    if (!list) return undefined;
    for (const c of list) if (c.sha.equals(fp.sha)) return c.loc;
    return undefined;
  }
}
