// Frame codecs. The stored bytes of each codec are specified in
// docs/format.md:
//   zstd: one standard zstd frame (readable by the zstd CLI).
//   lz4:  an LZ4 *block* prefixed with its uncompressed size as u32 LE
//         (lz4_flex's size-prepended block format; not the LZ4 frame format).
//   none: the bytes themselves.
// zstd-napi (native zstd 1.5) does the zstd work; zstd-codec, the design's
// named package, is kept as the fallback decoder when zstd-napi cannot load
// (bench/README.md has the numbers that made zstd-napi the default).
import { Codec, codecName } from './format';
import { ebadmsg } from './errors';

interface Impl {
  compress(b: Uint8Array, level: number): Uint8Array;
  decompress(b: Uint8Array, expectSize: number): Uint8Array;
}

let zstdNapi: typeof import('zstd-napi') | null | undefined;
function zstd(): typeof import('zstd-napi') | null {
  if (zstdNapi === undefined) {
    try { zstdNapi = require('zstd-napi'); } catch { zstdNapi = null; }
  }
  return zstdNapi ?? null;
}

let lz4: { compress(b: Uint8Array): Uint8Array; decompress(b: Uint8Array): Uint8Array } | undefined;

const impls: Record<Codec, Impl> = {
  [Codec.None]: { compress: (b) => b, decompress: (b) => b },
  [Codec.Zstd]: {
    compress(b, level) {
      const z = zstd();
      if (!z) throw new Error('zstd-napi is not available to compress (run `npm run setup`)');
      return z.compress(b, { compressionLevel: level });
    },
    decompress(b, expect) {
      const z = zstd();
      if (z) return z.decompress(b);
      return zstdCodecDecompress(b, expect);
    },
  },
  [Codec.Lz4]: {
    compress(b) { lz4 ??= require('lz4-wasm-nodejs'); return lz4!.compress(b); },
    decompress(b, expect) {
      lz4 ??= require('lz4-wasm-nodejs');
      // The size prefix is trusted by the decoder: check it first so a corrupt
      // frame cannot make it allocate something huge.
      if (b.length < 4 || new DataView(b.buffer, b.byteOffset, 4).getUint32(0, true) !== expect) {
        throw ebadmsg(`lz4 frame declares a size other than ${expect}`);
      }
      return lz4!.decompress(b);
    },
  },
};

export function compress(codec: Codec, data: Uint8Array, level = 1): Uint8Array {
  return impls[codec].compress(data, level);
}

/** Decompresses and checks the size; any decoder failure becomes EBADMSG. */
export function decompress(codec: Codec, data: Uint8Array, expectSize: number): Uint8Array {
  let out: Uint8Array;
  try { out = impls[codec].decompress(data, expectSize); } catch (e) {
    throw ebadmsg(`${codecName(codec)} frame does not decode: ${(e as Error).message}`);
  }
  if (out.length !== expectSize) throw ebadmsg(`${codecName(codec)} frame decoded to ${out.length} bytes, expected ${expectSize}`);
  return out;
}

let dctx: { decompress(dst: Uint8Array, src: Uint8Array): number } | undefined;

/**
 * Decompresses straight into `dst` (a view of shared memory: no allocation,
 * no copy; native zstd writes there itself) and checks the size. Returns the
 * bytes written. Any decoder failure becomes EBADMSG.
 */
export function decompressInto(codec: Codec, data: Uint8Array, dst: Uint8Array): number {
  if (codec === Codec.Zstd && zstd()) {
    let n: number;
    try {
      dctx ??= new (require('zstd-napi/binding') as { DCtx: new () => typeof dctx }).DCtx()!;
      n = dctx.decompress(dst, data);
    } catch (e) {
      throw ebadmsg(`zstd frame does not decode: ${(e as Error).message}`);
    }
    if (n !== dst.length) throw ebadmsg(`zstd frame decoded to ${n} bytes, expected ${dst.length}`);
    return n;
  }
  const out = decompress(codec, data, dst.length);
  dst.set(out);
  return out.length;
}

// zstd-codec is emscripten and initialises asynchronously; it is only a
// fallback, so it is loaded lazily and used through its streaming API (its
// Simple API returns null for frames without a content size).
let zc: { Streaming: new () => { decompress(b: Uint8Array, size?: number): Uint8Array } } | undefined;
export function loadZstdCodec(): Promise<void> {
  return new Promise((resolve) => {
    require('zstd-codec').ZstdCodec.run((z: typeof zc) => { zc = z; resolve(); });
  });
}
function zstdCodecDecompress(b: Uint8Array, expect: number): Uint8Array {
  if (!zc) throw new Error('no zstd decoder loaded (zstd-napi missing; call loadZstdCodec())');
  return new zc.Streaming().decompress(b, expect);
}
export const hasNativeZstd = () => zstd() !== null;
