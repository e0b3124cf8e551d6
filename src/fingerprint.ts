// Block fingerprints for dedup: xxh64 (WASM, fast) finds candidates, a
// 128-bit SHA-256 prefix confirms them, so two blocks are only ever treated as
// one when both agree. Each layer stores the fingerprints of its own stored
// blocks (in data order) in its index object; format in docs/format.md.
import { ebadmsg } from './errors';

export interface Fingerprint { xx: bigint; sha: Buffer }
export interface Location { layer: number; data: number }

const MAGIC = Buffer.from('STRATAIX', 'ascii');
const ENTRY = 24;

export function encodeIndex(fps: Fingerprint[], checksum: (b: Buffer) => bigint): Buffer {
  const b = Buffer.alloc(16 + fps.length * ENTRY + 8);
  MAGIC.copy(b, 0);
  b.writeUInt32LE(1, 8);
  b.writeUInt32LE(fps.length, 12);
  fps.forEach((f, i) => { b.writeBigUInt64LE(f.xx, 16 + i * ENTRY); f.sha.copy(b, 24 + i * ENTRY, 0, 16); });
  const end = 16 + fps.length * ENTRY;
  b.writeBigUInt64LE(checksum(b.subarray(0, end)), end);
  return b;
}

export function decodeIndex(b: Buffer, checksum: (b: Buffer) => bigint, id: string): Fingerprint[] {
  if (b.length < 24 || !b.subarray(0, 8).equals(MAGIC)) throw ebadmsg(`layer ${id} index: wrong magic or truncated`);
  const n = b.readUInt32LE(12);
  const end = 16 + n * ENTRY;
  if (b.readUInt32LE(8) !== 1 || b.length !== end + 8) throw ebadmsg(`layer ${id} index: bad version or length`);
  if (b.readBigUInt64LE(end) !== checksum(b.subarray(0, end))) throw ebadmsg(`layer ${id} index: checksum mismatch`);
  const out: Fingerprint[] = new Array(n);
  for (let i = 0; i < n; i++) out[i] = { xx: b.readBigUInt64LE(16 + i * ENTRY), sha: b.subarray(24 + i * ENTRY, 40 + i * ENTRY) };
  return out;
}

/** Candidate map xxh64 → locations, confirmed by the sha prefix on lookup. */
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
