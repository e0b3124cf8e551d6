// The record of which frames of a layer's local cache file hold verified
// bytes, so a later process can use them (docs/format.md, "Template cache").
// Append-only: a CACHED record is written only after the frame's bytes were
// synced, a DROPPED record when a frame leaves the cache. Each record carries
// the xxh64 of the frame's uncompressed bytes and its own checksum: a torn or
// damaged record is skipped, and the bytes it names are verified again before
// anything serves them, so neither a lost sync nor a flipped byte on disk is
// ever served as data.
import * as fs from 'fs';

export const JOURNAL_MAGIC = Buffer.from('STRATACJ', 'ascii');
export const JOURNAL_VERSION = 1;
const HEAD_LEN = 40; // magic 8, version 4, frames 4, layer id 16, checksum 8
const REC_LEN = 24; // kind 4, frame 4, sum 8, checksum 8
export const enum RecordKind { Cached = 1, Dropped = 2 }

export interface CacheRecord { kind: RecordKind; frame: number; sum: bigint }

export class CacheJournal {
  private constructor(readonly file: string, private fdNo: number, private readonly hash: (b: Buffer) => bigint) {}

  /**
   * Opens (or starts) the journal of layer `id` with `frames` frames and
   * returns the frames it names as cached, with their sums. A journal of
   * another layer or shape, or unreadable, is started afresh (nothing in it
   * is trusted); one with more records than twice its live frames is compacted.
   */
  static open(file: string, id: string, frames: number, hash: (b: Buffer) => bigint): { journal: CacheJournal; cached: Map<number, bigint>; skipped: number } {
    const head = Buffer.alloc(HEAD_LEN);
    JOURNAL_MAGIC.copy(head, 0);
    head.writeUInt32LE(JOURNAL_VERSION, 8);
    head.writeUInt32LE(frames, 12);
    Buffer.from(id, 'hex').copy(head, 16);
    head.writeBigUInt64LE(hash(head.subarray(0, 32)), 32);
    const cached = new Map<number, bigint>();
    let skipped = 0, total = 0, ours = false;
    let bytes: Buffer | null = null;
    try { bytes = fs.readFileSync(file); } catch { /* none yet */ }
    if (bytes && bytes.length >= HEAD_LEN && bytes.subarray(0, HEAD_LEN).equals(head)) {
      ours = true;
      for (let o = HEAD_LEN; o + REC_LEN <= bytes.length; o += REC_LEN) {
        total++;
        const r = decodeRecord(bytes.subarray(o, o + REC_LEN), frames, hash);
        if (!r) { skipped++; continue; }
        if (r.kind === RecordKind.Cached) cached.set(r.frame, r.sum);
        else cached.delete(r.frame);
      }
      if ((bytes.length - HEAD_LEN) % REC_LEN) skipped++; // a torn tail
    } else if (bytes) skipped = 1; // another layer, shape or version: started afresh
    const fresh = !ours || skipped > 0 || total > 2 * cached.size + 64;
    if (fresh) {
      // Rewritten whole, then renamed over: a crash leaves the old or the new.
      const tmp = `${file}.tmp`;
      const out = Buffer.concat([head, ...[...cached].map(([frame, sum]) => encodeRecord({ kind: RecordKind.Cached, frame, sum }, hash))]);
      fs.writeFileSync(tmp, out, { mode: 0o600 });
      const t = fs.openSync(tmp, 'r');
      try { fs.fsyncSync(t); } finally { fs.closeSync(t); }
      fs.renameSync(tmp, file);
    }
    const fd = fs.openSync(file, 'a', 0o600);
    return { journal: new CacheJournal(file, fd, hash), cached, skipped };
  }

  /** The journal's descriptor (-1 once closed), for syncing its records. */
  get fd(): number { return this.fdNo; }

  /** Appends records (one write; a torn one is skipped when read back). */
  append(recs: CacheRecord[]): void {
    if (!recs.length || this.fdNo < 0) return;
    fs.writeSync(this.fdNo, Buffer.concat(recs.map((r) => encodeRecord(r, this.hash))));
  }

  close(): void {
    if (this.fdNo >= 0) fs.closeSync(this.fdNo);
    this.fdNo = -1;
  }
}

function encodeRecord(r: CacheRecord, hash: (b: Buffer) => bigint): Buffer {
  const b = Buffer.alloc(REC_LEN);
  b.writeUInt32LE(r.kind, 0);
  b.writeUInt32LE(r.frame, 4);
  b.writeBigUInt64LE(r.sum, 8);
  b.writeBigUInt64LE(hash(b.subarray(0, 16)), 16);
  return b;
}

function decodeRecord(b: Buffer, frames: number, hash: (b: Buffer) => bigint): CacheRecord | null {
  if (b.readBigUInt64LE(16) !== hash(b.subarray(0, 16))) return null;
  const kind = b.readUInt32LE(0), frame = b.readUInt32LE(4);
  if ((kind !== RecordKind.Cached && kind !== RecordKind.Dropped) || frame >= frames) return null;
  return { kind, frame, sum: b.readBigUInt64LE(8) };
}
