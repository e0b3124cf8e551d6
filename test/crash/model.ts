// The crash harness's two halves that must agree: the seeded operation
// stream a driver issues against a device, and the reference model that
// says which contents each 4 KiB block may have after a crash.
//
// Rules the model checks (a process kill keeps the page cache, so they are
// stronger than a power cut's "flushed data survives"):
//   - every acknowledged operation is present;
//   - a block an operation in flight at the kill touched reads as its old
//     contents or its new ones, never a third value;
//   - a snapshot is absent or complete and point-in-time: through the engine
//     API it reads exactly as the device did at the call (operations issued
//     before it included, as the API promises); through the daemon, where
//     the HTTP call and the NBD requests race, each block reads as it was at
//     some moment between the call and the acknowledgement.
// The driver never has two data operations on one block in flight at once,
// so "old" and "new" are always well defined.
import { createHash } from 'crypto';
import type { Device } from '../../src/index';
import { rng } from '../helpers/util';

export const B = 4096;

export type Op =
  | { i: number; kind: 'write'; off: number; len: number; fua: boolean }
  | { i: number; kind: 'zero'; off: number; len: number; fua: boolean; noHole: boolean }
  | { i: number; kind: 'trim'; off: number; len: number }
  | { i: number; kind: 'flush' }
  | { i: number; kind: 'snapshot' };
export type DataOp = Extract<Op, { off: number }>;

export const isData = (op: Op): op is DataOp => 'off' in op;

/** The ops of one run (one child process between two crashes): a pure function of its arguments. */
export function opStream(seed: number, epoch: number, blocks: number, count: number): Op[] {
  const r = rng((seed * 1_000_003 + epoch * 7919) >>> 0);
  const int = (n: number) => Math.floor(r() * n);
  const ops: Op[] = [];
  for (let i = 0; i < count; i++) {
    const k = r();
    // Ranges: whole blocks mostly, sometimes 512-byte aligned ends (read-modify-write).
    const range = (maxBlocks: number) => {
      const b0 = int(blocks), n = 1 + int(Math.min(maxBlocks, blocks - b0));
      let off = b0 * B, len = n * B;
      if (r() < 0.25) { const cut = 512 * int(8); off += cut; len -= cut; }
      if (r() < 0.25 && len > 512) len -= 512 * (1 + int(Math.min(7, len / 512 - 1)));
      return { off, len };
    };
    if (k < 0.45) ops.push({ i, kind: 'write', ...range(16), fua: r() < 0.15 });
    else if (k < 0.65) ops.push({ i, kind: 'zero', ...range(48), fua: r() < 0.15, noHole: r() < 0.1 });
    else if (k < 0.75) ops.push({ i, kind: 'trim', ...range(48) });
    else if (k < 0.93) ops.push({ i, kind: 'flush' });
    else ops.push({ i, kind: 'snapshot' });
  }
  return ops;
}

/** A write's bytes: every 16 bytes name the run, the op and the byte, so no two writes (or template bytes) agree. */
export function payload(seed: number, epoch: number, op: DataOp): Buffer {
  const b = Buffer.alloc(op.len);
  for (let o = 0; o < op.len; o += 16) {
    b.writeUInt32LE(0x57a7a000 | (epoch & 0xfff), o);
    b.writeUInt32LE(op.i, o + 4);
    b.writeUInt32LE(op.off + o, o + 8);
    b.writeUInt32LE(seed >>> 0, o + 12);
  }
  return b;
}

export function blocksOf(op: DataOp): [number, number] {
  return [Math.floor(op.off / B), Math.ceil((op.off + op.len) / B)];
}

const overlaps = (a: DataOp, b: DataOp) => {
  const [a0, a1] = blocksOf(a), [b0, b1] = blocksOf(b);
  return a0 < b1 && b0 < a1;
};

/** What a device under test must offer the driver. */
export interface Target {
  write(off: number, data: Buffer, fua: boolean): Promise<void>;
  zero(off: number, len: number, fua: boolean, noHole: boolean): Promise<void>;
  trim(off: number, len: number): Promise<void>;
  flush(): Promise<void>;
  /** Takes a snapshot; resolves to its layer id. */
  snapshot(): Promise<string>;
}

/** A device of the engine API as a Target. */
export function deviceTarget(dev: Device): Target {
  return {
    write: (off, data, fua) => dev.write(off, data, { fua }),
    zero: (off, len, fua, noHole) => dev.writeZeroes(off, len, { fua, noHole }),
    trim: (off, len) => dev.trim(off, len),
    flush: () => dev.flush(),
    snapshot: async () => (await dev.snapshot()).id,
  };
}

/**
 * Issues `ops` in order with up to `window` in flight, never two data ops
 * on one block nor two snapshots at once; reports each start and ack.
 */
export async function drive(t: Target, seed: number, epoch: number, ops: Op[], window: number,
  log: { start(op: Op): void; ack(op: Op, snapshot?: string): void }): Promise<void> {
  const inflight = new Map<number, { op: Op; done: Promise<void> }>();
  const blocked = (op: Op) => inflight.size >= window || [...inflight.values()].some((f) =>
    (isData(op) && isData(f.op) && overlaps(op, f.op)) || (op.kind === 'snapshot' && f.op.kind === 'snapshot'));
  let failure: Error | null = null;
  for (const op of ops) {
    while (blocked(op)) await Promise.race([...inflight.values()].map((f) => f.done));
    if (failure) throw failure;
    log.start(op);
    const run = async (): Promise<string | undefined> => {
      switch (op.kind) {
        case 'write': await t.write(op.off, payload(seed, epoch, op), op.fua); return;
        case 'zero': await t.zero(op.off, op.len, op.fua, op.noHole); return;
        case 'trim': await t.trim(op.off, op.len); return;
        case 'flush': await t.flush(); return;
        case 'snapshot': return t.snapshot();
      }
    };
    const done = run().then((snap) => { inflight.delete(op.i); log.ack(op, snap); },
      (e: Error) => { inflight.delete(op.i); failure ??= new Error(`op ${op.i} (${op.kind}) failed: ${e.message}`); });
    inflight.set(op.i, { op, done });
  }
  await Promise.all([...inflight.values()].map((f) => f.done));
  if (failure) throw failure;
}

/**
 * What a snapshot may hold: `base` (the acknowledged state at the call) and
 * the ops that may (or, with mustApply, must) have landed on it, in order.
 */
interface Expectation { base: Buffer; ops: DataOp[]; mustApply: boolean; epoch: number }

export function blockHashes(img: Uint8Array): string[] {
  const out: string[] = [];
  for (let o = 0; o < img.length; o += B) out.push(createHash('md5').update(img.subarray(o, o + B)).digest('hex').slice(0, 16));
  return out;
}

export class Model {
  /** The device as every acknowledged op left it. */
  img: Buffer;
  readonly blocks: number;
  private inflight = new Map<number, Op>();
  private epoch = 0;
  /** Snapshot layers acked but not yet seen in the store, with what they must hold. */
  private acked = new Map<string, Expectation>();
  /** A snapshot in flight: its layer may or may not exist. */
  private pendingSnap: Expectation | null = null;
  private snapAt = new Map<number, Expectation>();
  readonly known = new Set<string>();
  stats = { opsAcked: 0, blocksVerified: 0, snapshotsVerified: 0, inflightAtKill: 0 };

  /** mustApply: the API puts ops issued before a snapshot call into it (the engine's promise). */
  constructor(template: Buffer, readonly seed: number, private readonly snapshotIncludesEarlier: boolean) {
    this.img = Buffer.from(template);
    this.blocks = template.length / B;
  }

  beginEpoch(epoch: number): void { this.epoch = epoch; }

  start(op: Op): void {
    this.inflight.set(op.i, op);
    if (op.kind === 'snapshot') {
      const e: Expectation = { base: Buffer.from(this.img), ops: [...this.inflight.values()].filter(isData), mustApply: this.snapshotIncludesEarlier, epoch: this.epoch };
      this.snapAt.set(op.i, e);
    } else if (isData(op) && !this.snapshotIncludesEarlier) {
      for (const e of this.snapAt.values()) e.ops.push(op); // may land before the freeze
    }
  }

  ack(op: Op, snapshot?: string): void {
    this.inflight.delete(op.i);
    this.stats.opsAcked++;
    if (isData(op)) {
      const [b0, b1] = blocksOf(op);
      for (let b = b0; b < b1; b++) this.applied(op, this.block(this.img, b), b, this.epoch).copy(this.img, b * B);
    }
    if (op.kind === 'snapshot') {
      if (!snapshot) throw new Error(`snapshot op ${op.i} acked without a layer id`);
      const e = this.snapAt.get(op.i)!;
      this.snapAt.delete(op.i);
      if (!this.known.has(snapshot)) this.acked.set(snapshot, e);
    }
  }

  /** The process died: what was in flight stays undecided until the device is read back. */
  killed(): void {
    this.stats.inflightAtKill += this.inflight.size;
    const snaps = [...this.inflight.values()].filter((o) => o.kind === 'snapshot');
    if (snaps.length) this.pendingSnap = this.snapAt.get(snaps[0].i)!;
    const data = [...this.inflight.values()].filter(isData);
    this.undecided = this.undecided.concat(data.map((op) => ({ op, epoch: this.epoch })));
    this.inflight.clear();
    this.snapAt.clear();
  }
  private undecided: Array<{ op: DataOp; epoch: number }> = [];

  /** Checks the resumed device's block hashes; decides each undecided block. Throws on a third value. */
  checkDevice(hashes: string[]): void {
    if (hashes.length !== this.blocks) throw new Error(`device read back ${hashes.length} blocks, expected ${this.blocks}`);
    const have = blockHashes(this.img);
    for (let b = 0; b < this.blocks; b++) {
      if (hashes[b] === have[b]) continue;
      const u = this.undecided.find((x) => { const [b0, b1] = blocksOf(x.op); return b >= b0 && b < b1; });
      const alt = u ? this.applied(u.op, this.block(this.img, b), b, u.epoch) : null;
      if (alt && blockHashes(alt)[0] === hashes[b]) { alt.copy(this.img, b * B); continue; }
      throw new Error(`block ${b}: read back ${hashes[b]}, expected ${have[b]} (acknowledged state)` +
        (u ? ` or ${blockHashes(alt!)[0]} (op ${u.op.i} ${u.op.kind} in flight at the kill)` : ' (no op in flight touched it)'));
    }
    this.stats.blocksVerified += this.blocks;
    this.undecided = [];
  }

  /** Checks a layer found in the store that was not verified before. */
  checkLayer(id: string, hashes: string[]): void {
    let e = this.acked.get(id);
    let what = 'acknowledged snapshot';
    if (!e) {
      if (!this.pendingSnap) throw new Error(`layer ${id} is in the store but no snapshot made it (none acknowledged or in flight)`);
      e = this.pendingSnap; what = 'snapshot in flight at the kill';
    }
    for (let b = 0; b < this.blocks; b++) {
      const touching = e.ops.filter((o) => { const [b0, b1] = blocksOf(o); return b >= b0 && b < b1; });
      let blk = this.block(e.base, b);
      const cands: string[] = [];
      if (!touching.length || !e.mustApply) cands.push(blockHashes(blk)[0]);
      for (const op of touching) { blk = this.applied(op, blk, b, e.epoch); cands.push(blockHashes(blk)[0]); }
      if (!cands.includes(hashes[b])) throw new Error(`${what} ${id}, block ${b}: read ${hashes[b]}, expected one of ${cands.join(', ')} (not the device as it was at the snapshot call)`);
    }
    if (e === this.pendingSnap) this.pendingSnap = null;
    this.acked.delete(id);
    this.known.add(id);
    this.stats.snapshotsVerified++;
  }

  /** After every layer in the store was checked: no acknowledged snapshot may be missing. */
  layersChecked(): void {
    if (this.acked.size) throw new Error(`acknowledged snapshot(s) missing from the store: ${[...this.acked.keys()].join(', ')}`);
    this.pendingSnap = null;
  }

  private block(img: Buffer, b: number): Buffer { return img.subarray(b * B, (b + 1) * B); }

  /** Block b (contents `blk`) with `op` applied. */
  private applied(op: DataOp, blk: Buffer, b: number, epoch: number): Buffer {
    const out = Buffer.from(blk);
    const from = Math.max(op.off, b * B), to = Math.min(op.off + op.len, (b + 1) * B);
    if (op.kind === 'write') payload(this.seed, epoch, op).copy(out, from - b * B, from - op.off, to - op.off);
    else out.fill(0, from - b * B, to - b * B);
    return out;
  }
}
