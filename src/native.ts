// Typed loader for the io_uring addon (native/strata_native.cc).
//
// Requests are 32-byte little-endian descriptors in a SharedArrayBuffer `sq`:
//   0 u8 op | 1 u8 flags | 2 u16 bufIndex | 4 i32 fd | 8 u32 len | 12 u32 id
//   16 u64 bufOffset (FALLOCATE: length) | 24 u64 fileOffset
// Completions are 8-byte entries in `cq`: 0 u32 id | 4 i32 res (bytes or -errno).
import * as path from 'path';

/** SEND/RECV: sockets (send with MSG_NOSIGNAL). */
export const OP = { READ: 1, WRITE: 2, FSYNC: 3, FDATASYNC: 4, FALLOCATE: 5, NOP: 6, SEND: 7, RECV: 8, UBLK_CMD: 9 } as const;
export type OpCode = (typeof OP)[keyof typeof OP];

/** READ/WRITE: use the registered buffer (silently non-fixed if registration failed). */
export const FLAG_FIXED = 1;
/** READ/WRITE on slot bufIndex of a sparse fixed-buffer table (sparseBuffers), at bufOffset within it. */
export const FLAG_RAW_FIXED = 8;
/** FALLOCATE: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE. */
export const FLAG_PUNCH = 2;
/** FALLOCATE: FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE. */
export const FLAG_ZERO_RANGE = 4;

export const SQ_ENTRY = 32;
export const CQ_ENTRY = 8;

export type RegionSource = SharedArrayBuffer | ArrayBuffer | ArrayBufferView;

export interface NativeRing {
  /** Adds a region (index 0, 1, 2…); descriptors address `buf + byteOffset + bufOffset`. */
  addRegion(buf: RegionSource, byteOffset: number, byteLength: number): number;
  /** 0, or -errno (e.g. -ENOMEM under a small RLIMIT_MEMLOCK, -EBUSY while ops are in flight). */
  registerRegions(): number;
  /** A table of n empty fixed-buffer slots the kernel fills itself (ublk AUTO_BUF_REG); 0 or -errno. */
  sparseBuffers(n: number): number;
  /** Submits sq[start .. start+count) (mod capacity); throws EBUSY past maxInflight. Returns count. */
  submit(start: number, count: number): number;
  /** submit(), then reap(): returns how many completions are in cq[0..n) for the caller. */
  submitReap(start: number, count: number): number;
  /** Writes region bufIndex's [bufOffset, +len) to fd at fileOffset now, on this thread (all of it): len or -errno. */
  pwrite(bufIndex: number, bufOffset: number, len: number, fd: number, fileOffset: number): number;
  /** Non-blocking: copies completed ops into cq[0..n) and returns n. */
  reap(): number;
  /** Blocks for min(minComplete, inflight) completions, reaps all available into cq[0..n), returns n. */
  wait(minComplete: number): number;
  /** Submitted and not yet reaped. */
  readonly inflight: number;
  /** Completions waiting to be reaped (no syscall, nothing consumed); 0 once closed. */
  readonly ready: number;
  /** CQ ring size (4 × entries, clamped by the kernel): the in-flight limit submit() enforces. */
  readonly maxInflight: number;
  /** Idempotent; cancels or waits out in-flight ops (their completions are dropped). */
  close(): void;
}

export interface NativeRingConstructor {
  /** With onComplete the ring is async (completions arrive on the event loop); otherwise use wait(). */
  new (
    entries: number,
    sq: SharedArrayBuffer,
    cq: SharedArrayBuffer,
    onComplete?: (count: number) => void,
  ): NativeRing;
}

export interface NativeInfo {
  liburing: string;
  probeOps: string[];
}

export interface NativeAddon {
  Ring: NativeRingConstructor;
  info(): NativeInfo;
  pageSize(): number;
  /** [start, end, start, end, …] byte ranges holding data (SEEK_DATA/SEEK_HOLE) below size. */
  dataExtents(fd: number, size: number): number[];
  /** Writes back and evicts a file's cached pages (tests and benches of cold reads). */
  dropPageCache(fd: number): void;
  /** A blocking eventfd: a READ of it in a ring waits until another thread writes 8 bytes. */
  eventfd(): number;
  /** PR_SET_IO_FLUSHER for the calling thread (reclaim never waits on writeback through a device it serves): 0 or -errno. */
  ioFlusher(): number;
  /** A cloexec duplicate of a descriptor. */
  dup(fd: number): number;
  /** close(2), for descriptors Node's fs did not open (eventfd(), dup()). */
  close(fd: number): void;
  /** shutdown(SHUT_RDWR): also ends a receive a ring waits on. */
  shutdownSocket(fd: number): void;
  /** A connected pair of unix stream sockets (cloexec). */
  socketPair(): [number, number];
}

/** Shape of every error the addon throws. */
export interface NativeError extends Error {
  errno: number;
  code: string;
}

export interface Desc {
  op: number;
  flags: number;
  bufIndex: number;
  fd: number;
  len: number;
  id: number;
  bufOffset: number;
  fileOffset: number;
}

export const NATIVE_PATH = path.join(__dirname, '..', 'build', 'Release', 'strata_native.node');

let cached: NativeAddon | undefined;

export function loadNative(): NativeAddon {
  if (cached) return cached;
  try {
    cached = require(NATIVE_PATH) as NativeAddon;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    // Not built, or built but liburing.so is absent on this machine.
    if (code === 'MODULE_NOT_FOUND' || code === 'ERR_DLOPEN_FAILED') {
      const msg = `strata native addon unavailable (${NATIVE_PATH}): ${(err as Error).message}\n` +
        'Run `npm run setup` to install liburing-dev and build it.';
      throw Object.assign(new Error(msg), { cause: err });
    }
    throw err;
  }
  return cached;
}

const TWO_32 = 0x1_0000_0000;

/** Encodes one descriptor at sq slot index % capacity (u64s as two u32s: no BigInt allocation). */
export function writeDesc(view: DataView, index: number, capacity: number, d: Desc): void {
  const o = (index % capacity) * SQ_ENTRY;
  view.setUint8(o, d.op);
  view.setUint8(o + 1, d.flags);
  view.setUint16(o + 2, d.bufIndex, true);
  view.setInt32(o + 4, d.fd, true);
  view.setUint32(o + 8, d.len, true);
  view.setUint32(o + 12, d.id, true);
  view.setUint32(o + 16, d.bufOffset >>> 0, true);
  view.setUint32(o + 20, Math.floor(d.bufOffset / TWO_32), true);
  view.setUint32(o + 24, d.fileOffset >>> 0, true);
  view.setUint32(o + 28, Math.floor(d.fileOffset / TWO_32), true);
}
