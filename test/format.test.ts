import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { decodeHeader, encodeHeader, LayerHeader, Codec, ZERO_LAYER, MAX_HEADER, FLAG_INCOMPLETE, Extent } from '../src/format';
import { overlay, normalize, shiftForChild } from '../src/mapping';
import { SharedHeap } from '../src/wasm';
import { StrataError } from '../src/errors';

const heap = new SharedHeap({ reserveBytes: 65536 });
const sum = (b: Buffer) => BigInt.asUintN(64, (() => { const p = heap.alloc(b.length || 1); heap.u8.set(b, p); const h = heap.wasm.xxh64(p, b.length, 0n); heap.free(p); return h; })());
const id = (n: number) => n.toString(16).padStart(32, '0');

function sample(): LayerHeader {
  return {
    flags: 0, blockSize: 4096, codec: Codec.Zstd, virtualSize: 16 * 4096, chain: [id(2), id(1)], dataSize: 3 * 4096,
    extents: [
      { dev: 0, len: 2 * 4096, layer: 0, data: 0 },
      { dev: 2 * 4096, len: 4 * 4096, layer: ZERO_LAYER, data: 0 },
      { dev: 6 * 4096, len: 10 * 4096, layer: 1, data: 8192 },
    ],
    frames: [{ u: 0, c: 0, uSize: 3 * 4096, cSize: 100, checksum: 0x1234567890abcdefn }],
  };
}

const code = (f: () => unknown): string => { try { f(); } catch (e) { return (e as StrataError).code; } return 'none'; };

test('xxh64 matches the reference vectors', () => {
  assert.is(sum(Buffer.alloc(0)).toString(16), 'ef46db3751d8e999');
  assert.is(sum(Buffer.from('abc')).toString(16), '44bc2cf5ad770999');
  assert.is(sum(Buffer.from('Nobody inspects the spammish repetition')).toString(16), 'fbcea83c8a378bf1');
});

test('header round-trips byte for byte', () => {
  const h = sample();
  const b = encodeHeader(h, sum);
  const d = decodeHeader(b, sum);
  assert.equal(d, h);
  assert.ok(encodeHeader(d, sum).equals(b));
});

test('decode rejects wrong magic, truncation, corruption, version, incomplete, oversize', () => {
  const b = encodeHeader(sample(), sum);
  const bad = (mut: (x: Buffer) => Buffer) => code(() => decodeHeader(mut(Buffer.from(b)), sum));
  assert.is(bad((x) => { x[0] = 0x41; return x; }), 'EBADMSG');
  assert.is(bad((x) => x.subarray(0, x.length - 9)), 'EBADMSG');
  assert.is(bad((x) => x.subarray(0, 20)), 'EBADMSG');
  assert.is(bad((x) => { x[100] ^= 1; return x; }), 'EBADMSG');
  assert.is(bad((x) => { x.writeUInt32LE(2, 8); return x; }), 'EBADMSG');
  assert.is(bad(() => Buffer.alloc(MAX_HEADER + 1)), 'EBADMSG');
  const inc = { ...sample(), flags: FLAG_INCOMPLETE };
  assert.is(code(() => decodeHeader(encodeHeader(inc, sum), sum)), 'EBADMSG');
});

test('encode refuses headers that could not be read back', () => {
  const gap = sample(); gap.extents[1].dev += 4096;
  assert.is(code(() => encodeHeader(gap, sum)), 'EINVAL');
  const outside = sample(); outside.extents[2].layer = 5;
  assert.is(code(() => encodeHeader(outside, sum)), 'EINVAL');
  const past = sample(); past.extents[0].len = 4 * 4096; past.extents[1].dev = 4 * 4096; past.extents[1].len = 2 * 4096;
  assert.is(code(() => encodeHeader(past, sum)), 'EINVAL');
  const chain = sample(); chain.chain = Array.from({ length: 5000 }, (_, i) => id(i + 1));
  assert.is(code(() => encodeHeader(chain, sum)), 'EINVAL');
  const frames = sample(); frames.frames[0].uSize = 4096;
  assert.is(code(() => encodeHeader(frames, sum)), 'EINVAL');
});

test('normalize merges only storage-contiguous runs (H13)', () => {
  const ext: Extent[] = [
    { dev: 0, len: 4096, layer: 1, data: 0 },
    { dev: 4096, len: 4096, layer: 1, data: 4096 },      // contiguous: merges
    { dev: 8192, len: 4096, layer: 1, data: 40960 },     // same layer, not contiguous: must stay
    { dev: 12288, len: 4096, layer: ZERO_LAYER, data: 0 },
    { dev: 16384, len: 8192, layer: ZERO_LAYER, data: 0 }, // zero runs merge
    { dev: 24576, len: 4096, layer: 2, data: 44960 + 4096 },
  ];
  const n = normalize(heap, ext);
  assert.equal(n.map((e) => [e.dev, e.len, e.layer === ZERO_LAYER ? 'z' : e.layer, e.data]), [
    [0, 8192, 1, 0], [8192, 4096, 1, 40960], [12288, 12288, 'z', 0], [24576, 4096, 2, 49056],
  ]);
});

test('overlay cuts base extents and keeps their data offsets aligned', () => {
  const base: Extent[] = [{ dev: 0, len: 10 * 4096, layer: 0, data: 100 * 4096 }];
  const child = shiftForChild(base);
  assert.is(child[0].layer, 1);
  const out = overlay(child, [{ dev: 3 * 4096, len: 2 * 4096, layer: 0, data: 0 }, { dev: 9 * 4096, len: 4096, layer: ZERO_LAYER, data: 0 }]);
  assert.equal(out.map((e) => [e.dev / 4096, e.len / 4096, e.layer, e.data / 4096]), [
    [0, 3, 1, 100], [3, 2, 0, 0], [5, 4, 1, 105], [9, 1, ZERO_LAYER, 0],
  ]);
});

test.run();
