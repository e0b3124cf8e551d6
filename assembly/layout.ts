// The shared-memory layouts of strata's data plane, defined here once: block
// and frame states, and the 32-byte extent and frame records. The WASM module
// exports them; TypeScript reads them from the instance (src/wasm.ts) and
// writes records through the accessors below (the native addon reads no
// record: it only synchronises). Multi-byte fields are little-endian.

// ---------------------------------------------------------------- states
// One byte per block. A device overlay uses ABSENT/DIRTY/ZERO/CLEAN; a layer's
// frame cache uses ABSENT/FETCHING/CACHED.
export const ABSENT: u8 = 0;
export const FETCHING: u8 = 1;
export const CACHED: u8 = 2; // frame verified and present in the layer cache file
export const DIRTY: u8 = 3; // block written by the device, lives in the overlay file
export const ZERO: u8 = 4; // block trimmed / zero-written, no data anywhere
export const CLEAN: u8 = 5; // overlay holds a verified copy of the base block

// ---------------------------------------------------------------- extents
// Extent record: where a run of device bytes lives. Sorted by device offset,
// covering the device without gaps.
export const EXTENT_SIZE: u32 = 32;
export const EXT_DEV: u32 = 0; // u64 device offset
export const EXT_LEN: u32 = 8; // u64 length
export const EXT_LAYER: u32 = 16; // u32 chain index of the layer, ZERO_LAYER for zeros
export const EXT_DATA: u32 = 24; // u64 offset in that layer's uncompressed data (0 for zeros)
export const ZERO_LAYER: u32 = 0xffffffff;

// ---------------------------------------------------------------- frames
// Frame record: one compressed frame of a layer. Sorted by uOffset, contiguous.
export const FRAME_SIZE: u32 = 32;
export const FRAME_U: u32 = 0; // u64 offset of its bytes in the layer's uncompressed data
export const FRAME_C: u32 = 8; // u64 offset of the frame in the layer's data object
export const FRAME_USIZE: u32 = 16; // u32 uncompressed size
export const FRAME_CSIZE: u32 = 20; // u32 compressed size
export const FRAME_SUM: u32 = 24; // u64 xxh64 of the compressed bytes

export function extentPut(ext: usize, i: u32, dev: u64, len: u64, layer: u32, data: u64): void {
  const r = ext + <usize>i * EXTENT_SIZE;
  store<u64>(r + EXT_DEV, dev);
  store<u64>(r + EXT_LEN, len);
  store<u32>(r + EXT_LAYER, layer);
  store<u32>(r + EXT_LAYER + 4, 0);
  store<u64>(r + EXT_DATA, layer == ZERO_LAYER ? 0 : data);
}
export function extentDev(ext: usize, i: u32): u64 { return load<u64>(ext + <usize>i * EXTENT_SIZE + EXT_DEV); }
export function extentLen(ext: usize, i: u32): u64 { return load<u64>(ext + <usize>i * EXTENT_SIZE + EXT_LEN); }
export function extentLayer(ext: usize, i: u32): u32 { return load<u32>(ext + <usize>i * EXTENT_SIZE + EXT_LAYER); }
export function extentData(ext: usize, i: u32): u64 { return load<u64>(ext + <usize>i * EXTENT_SIZE + EXT_DATA); }

export function framePut(frames: usize, i: u32, u: u64, c: u64, uSize: u32, cSize: u32, sum: u64): void {
  const r = frames + <usize>i * FRAME_SIZE;
  store<u64>(r + FRAME_U, u);
  store<u64>(r + FRAME_C, c);
  store<u32>(r + FRAME_USIZE, uSize);
  store<u32>(r + FRAME_CSIZE, cSize);
  store<u64>(r + FRAME_SUM, sum);
}
export function frameU(frames: usize, i: u32): u64 { return load<u64>(frames + <usize>i * FRAME_SIZE + FRAME_U); }
export function frameUSize(frames: usize, i: u32): u32 { return load<u32>(frames + <usize>i * FRAME_SIZE + FRAME_USIZE); }

// ---------------------------------------------------------------- device views
// What a device reads through, for the read planner (assembly/plan.ts): a
// VIEW header, then its frozen overlays (oldest first) and its chain's
// layers (by chain index), in one allocation the device rewrites whenever
// the view changes.
export const VIEW_SIZE: u32 = 32;
export const VIEW_CUR_FD: u32 = 0; // i32 current overlay file
export const VIEW_CUR_TABLE: u32 = 4; // u32 heap offset of its block states
export const VIEW_NFROZEN: u32 = 8; // u32 frozen overlays (uploading snapshots)
export const VIEW_FROZEN: u32 = 12; // u32 heap offset of nFrozen OVERLAY records
export const VIEW_EXT: u32 = 16; // u32 heap offset of the base mapping's extent records
export const VIEW_NEXT: u32 = 20; // u32 extent count
export const VIEW_NLAYERS: u32 = 24; // u32 layers in the chain
export const VIEW_LAYERS: u32 = 28; // u32 heap offset of nLayers LAYER records
export const OVERLAY_SIZE: u32 = 8;
export const OVL_FD: u32 = 0; // i32
export const OVL_TABLE: u32 = 4; // u32
export const LAYER_SIZE: u32 = 20;
export const LYR_FD: u32 = 0; // i32 cache file (-1: the mapping never reads this layer)
export const LYR_STATES: u32 = 4; // u32 one state byte per frame
export const LYR_FRAMES: u32 = 8; // u32 FRAME records
export const LYR_NFRAMES: u32 = 12; // u32
export const LYR_REFS: u32 = 16; // u32 one "recently read" byte per frame (eviction clock)

// ---------------------------------------------------------------- read plans
// A planned read is a list of segments, each a piece of the request in
// order: from a file (an overlay), zeros, or a layer's uncompressed data
// (through its cache).
export const SEG_SIZE: u32 = 24;
export const SEG_KIND: u32 = 0; // u32 SEG_FILE / SEG_ZERO / SEG_LAYER
export const SEG_REF: u32 = 4; // i32 the file (SEG_FILE) or the layer's chain index (SEG_LAYER)
export const SEG_OFF: u32 = 8; // u64 offset in the file, or in the layer's data
export const SEG_LEN: u32 = 16; // u32 bytes
export const SEG_DST: u32 = 20; // u32 offset of the piece within the request
export const SEG_FILE: u32 = 1;
export const SEG_ZERO: u32 = 2;
export const SEG_LAYER: u32 = 3;

// ---------------------------------------------------------------- gates
// A device's gate and stripes between the engine (main thread) and the I/O
// workers that serve its requests (assembly/gate.ts): a header, the
// counters, then GATE_NSTRIPES i32 stripe counts at GATE_STRIPES.
export const GATE_JS_WRITERS: u32 = 0; // i32 engine requests holding the gate as a writer
export const GATE_JS_READERS: u32 = 4; // i32 ... as a reader
export const GATE_NAT_READERS: u32 = 8; // i32 worker reads in flight
export const GATE_NAT_WRITERS: u32 = 12; // i32 worker writes in flight
export const GATE_VIEW: u32 = 16; // u32 the device's VIEW record (0: none, every request goes to the engine)
export const GATE_REFS: u32 = 20; // i32 holders: the device, and each channel serving it
export const GATE_DEV_SIZE: u32 = 24; // u64 device bytes
export const GATE_STATS: u32 = 32; // u64 counters, by GS_* index (gateStat)
export const GS_FAST_READS: u32 = 0;
export const GS_FAST_WRITES: u32 = 1;
export const GS_SLOW_PLANS: u32 = 2; // = GS_SLOW_GATE + GS_SLOW_BUSY + requests the tables cannot place
export const GS_SLOW_GATE: u32 = 3;
export const GS_SLOW_BUSY: u32 = 4;
export const GS_READ_BYTES: u32 = 5;
export const GS_WRITE_BYTES: u32 = 6;
export const GS_LAT: u32 = 7; // GATE_LAT_BUCKETS reads, then as many writes (service time, gateLatBound)
export const GATE_LAT_BUCKETS: u32 = 16;
export const GS_LAT_SUM: u32 = GS_LAT + 2 * GATE_LAT_BUCKETS; // read ns, then write ns
export const GATE_STRIPES: u32 = 4096;
export const GATE_NSTRIPES: u32 = 16384; // 4 KiB each, indexes wrap around
export const GATE_BYTES: u32 = GATE_STRIPES + GATE_NSTRIPES * 4;
