// Layer format v1: header encoding, decoding and validation (byte layout in
// docs/format.md). Limits are enforced on encode as well as decode, so a
// header that cannot be read back is never written (hazard H13).
import { ebadmsg, einval } from './errors';

export const MAGIC = Buffer.from('STRATALY', 'ascii');
export const VERSION = 1;
export const BLOCK_SIZE = 4096;
export const FRAME_MAX = 2 * 1024 * 1024; // uncompressed bytes per frame, at most
export const FIXED_LEN = 80;
export const EXTENT_LEN = 32;
export const FRAME_LEN = 32;
export const ID_LEN = 16;
export const MAX_HEADER = 64 * 1024 * 1024;
export const MAX_CHAIN = 4096;
export const MAX_VIRTUAL = 2 ** 50; // 1 PiB keeps every offset exact in a JS number
export const ZERO_LAYER = 0xffffffff;
export const FLAG_INCOMPLETE = 1;

export enum Codec { None = 0, Zstd = 1, Lz4 = 2 }
export const codecName = (c: Codec) => (['none', 'zstd', 'lz4'][c] ?? `codec#${c}`);
export function parseCodec(s: string): Codec {
  const c = ({ none: Codec.None, zstd: Codec.Zstd, lz4: Codec.Lz4 } as Record<string, Codec>)[s];
  if (c === undefined) throw einval(`unknown codec ${JSON.stringify(s)} (expected zstd, lz4 or none)`);
  return c;
}

/** A device range mapped to `layer` (index into chain) at `data`, or zero. */
export interface Extent { dev: number; len: number; layer: number; data: number }
export interface Frame { u: number; c: number; uSize: number; cSize: number; checksum: bigint }

export interface LayerHeader {
  flags: number;
  blockSize: number;
  codec: Codec;
  virtualSize: number;
  /** chain[0] is this layer's id, then its parent, grandparent, ... */
  chain: string[];
  /** Uncompressed bytes of this layer's own data (sum of frame uSize). */
  dataSize: number;
  extents: Extent[];
  frames: Frame[];
}

export const layerId = (h: LayerHeader) => h.chain[0];
export const ID_RE = /^[0-9a-f]{32}$/;

export function headerLength(nChain: number, nExt: number, nFrames: number): number {
  return FIXED_LEN + nChain * ID_LEN + nExt * EXTENT_LEN + nFrames * FRAME_LEN + 8;
}

export function encodeHeader(h: LayerHeader, checksum: (b: Buffer) => bigint): Buffer {
  validateHeader(h);
  const len = headerLength(h.chain.length, h.extents.length, h.frames.length);
  if (len > MAX_HEADER) throw einval(`header of ${len} bytes exceeds the ${MAX_HEADER}-byte limit (${h.extents.length} extents, ${h.frames.length} frames)`);
  const b = Buffer.alloc(len);
  MAGIC.copy(b, 0);
  b.writeUInt32LE(VERSION, 8);
  b.writeUInt32LE(h.flags, 12);
  b.writeUInt32LE(h.blockSize, 16);
  b.writeUInt32LE(h.codec, 20);
  b.writeBigUInt64LE(BigInt(h.virtualSize), 24);
  b.writeBigUInt64LE(BigInt(h.dataSize), 32);
  b.writeUInt32LE(FRAME_MAX, 40);
  b.writeUInt32LE(h.chain.length, 44);
  b.writeUInt32LE(h.extents.length, 48);
  b.writeUInt32LE(h.frames.length, 52);
  b.writeUInt32LE(len, 56);
  // 60..80 reserved (zero)
  let o = FIXED_LEN;
  for (const id of h.chain) { Buffer.from(id, 'hex').copy(b, o); o += ID_LEN; }
  for (const e of h.extents) {
    b.writeBigUInt64LE(BigInt(e.dev), o);
    b.writeBigUInt64LE(BigInt(e.len), o + 8);
    b.writeUInt32LE(e.layer, o + 16);
    b.writeBigUInt64LE(BigInt(e.layer === ZERO_LAYER ? 0 : e.data), o + 24);
    o += EXTENT_LEN;
  }
  for (const f of h.frames) {
    b.writeBigUInt64LE(BigInt(f.u), o);
    b.writeBigUInt64LE(BigInt(f.c), o + 8);
    b.writeUInt32LE(f.uSize, o + 16);
    b.writeUInt32LE(f.cSize, o + 20);
    b.writeBigUInt64LE(f.checksum, o + 24);
    o += FRAME_LEN;
  }
  b.writeBigUInt64LE(checksum(b.subarray(0, o)), o);
  return b;
}

export function decodeHeader(b: Buffer, checksum: (b: Buffer) => bigint, what = 'layer header'): LayerHeader {
  if (b.length > MAX_HEADER) throw ebadmsg(`${what}: ${b.length} bytes exceeds the ${MAX_HEADER}-byte limit`);
  if (b.length < FIXED_LEN + 8) throw ebadmsg(`${what}: truncated (${b.length} bytes)`);
  if (!b.subarray(0, 8).equals(MAGIC)) throw ebadmsg(`${what}: wrong magic (not a strata layer)`);
  const version = b.readUInt32LE(8);
  if (version !== VERSION) throw ebadmsg(`${what}: unsupported version ${version}`);
  const nChain = b.readUInt32LE(44), nExt = b.readUInt32LE(48), nFrames = b.readUInt32LE(52);
  const len = b.readUInt32LE(56);
  if (nChain > MAX_CHAIN || len !== headerLength(nChain, nExt, nFrames) || len !== b.length) {
    throw ebadmsg(`${what}: inconsistent lengths (declared ${len}, have ${b.length}; chain ${nChain}, extents ${nExt}, frames ${nFrames})`);
  }
  const sumAt = len - 8;
  if (b.readBigUInt64LE(sumAt) !== checksum(b.subarray(0, sumAt))) throw ebadmsg(`${what}: checksum mismatch`);
  const u64 = (o: number) => {
    const v = b.readBigUInt64LE(o);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw ebadmsg(`${what}: value out of range at ${o}`);
    return Number(v);
  };
  const h: LayerHeader = {
    flags: b.readUInt32LE(12), blockSize: b.readUInt32LE(16), codec: b.readUInt32LE(20),
    virtualSize: u64(24), dataSize: u64(32), chain: [], extents: [], frames: [],
  };
  if (b.readUInt32LE(40) !== FRAME_MAX) throw ebadmsg(`${what}: unsupported frame size ${b.readUInt32LE(40)}`);
  let o = FIXED_LEN;
  for (let i = 0; i < nChain; i++, o += ID_LEN) h.chain.push(b.toString('hex', o, o + ID_LEN));
  for (let i = 0; i < nExt; i++, o += EXTENT_LEN) {
    h.extents.push({ dev: u64(o), len: u64(o + 8), layer: b.readUInt32LE(o + 16), data: u64(o + 24) });
  }
  for (let i = 0; i < nFrames; i++, o += FRAME_LEN) {
    h.frames.push({ u: u64(o), c: u64(o + 8), uSize: b.readUInt32LE(o + 16), cSize: b.readUInt32LE(o + 20), checksum: b.readBigUInt64LE(o + 24) });
  }
  try { validateHeader(h); } catch (e) { throw ebadmsg(`${what}: ${(e as Error).message}`); }
  if (h.flags & FLAG_INCOMPLETE) throw ebadmsg(`${what}: layer ${h.chain[0]} is marked incomplete`);
  return h;
}

/** Structural checks shared by encode and decode. Throws EINVAL. */
export function validateHeader(h: LayerHeader): void {
  const bs = h.blockSize;
  if (bs !== BLOCK_SIZE) throw einval(`block size ${bs} (only ${BLOCK_SIZE} is supported)`);
  if (!(h.codec in Codec)) throw einval(`unknown codec ${h.codec}`);
  if (!Number.isSafeInteger(h.virtualSize) || h.virtualSize <= 0 || h.virtualSize % bs || h.virtualSize > MAX_VIRTUAL) {
    throw einval(`virtual size ${h.virtualSize} must be a positive multiple of ${bs} up to ${MAX_VIRTUAL}`);
  }
  if (h.chain.length < 1 || h.chain.length > MAX_CHAIN) throw einval(`chain length ${h.chain.length} (1..${MAX_CHAIN})`);
  for (const id of h.chain) if (!ID_RE.test(id)) throw einval(`bad layer id ${JSON.stringify(id)}`);
  if (new Set(h.chain).size !== h.chain.length) throw einval('chain repeats a layer');
  let pos = 0;
  for (const e of h.extents) {
    if (e.dev !== pos) throw einval(`extent at ${e.dev} leaves a gap or overlap (expected ${pos})`);
    if (e.len <= 0 || e.len % bs || e.dev % bs) throw einval(`extent ${e.dev}+${e.len} not block aligned`);
    if (e.layer !== ZERO_LAYER) {
      if (e.layer >= h.chain.length) throw einval(`extent ${e.dev} names layer #${e.layer} outside the chain`);
      if (e.data % bs) throw einval(`extent ${e.dev} data offset ${e.data} not block aligned`);
      if (e.layer === 0 && e.data + e.len > h.dataSize) throw einval(`extent ${e.dev} reads past this layer's data`);
    }
    pos += e.len;
  }
  if (pos !== h.virtualSize) throw einval(`extents cover ${pos} bytes, virtual size is ${h.virtualSize}`);
  let u = 0, c = 0;
  for (const f of h.frames) {
    if (f.u !== u || f.c !== c) throw einval(`frame at ${f.u} is not contiguous`);
    if (f.uSize <= 0 || f.uSize > FRAME_MAX || f.uSize % bs) throw einval(`frame at ${f.u} has bad size ${f.uSize}`);
    if (f.cSize <= 0 || f.cSize > FRAME_MAX + 65536) throw einval(`frame at ${f.u} has bad compressed size ${f.cSize}`);
    u += f.uSize; c += f.cSize;
  }
  if (u !== h.dataSize) throw einval(`frames hold ${u} bytes, data size is ${h.dataSize}`);
}

export const keys = {
  header: (id: string) => `layers/${id}/header`,
  data: (id: string) => `layers/${id}/data`,
  index: (id: string) => `layers/${id}/index`,
  profile: (id: string) => `layers/${id}/profile`,
};
