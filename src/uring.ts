// Promise API over the native io_uring ring. Requests are encoded as 32-byte
// descriptors straight into a SharedArrayBuffer the addon reads, and are
// submitted in one native call per event-loop turn; completions arrive in
// batches (one native->JS call per eventfd wake-up). Data buffers are offsets
// into one registered region of the shared WASM memory (READ_FIXED /
// WRITE_FIXED), so the kernel moves bytes straight into memory the WASM state
// machine and the workers can see.
import { loadNative, NativeRing, OP, FLAG_FIXED, FLAG_PUNCH, FLAG_ZERO_RANGE, SQ_ENTRY, CQ_ENTRY } from './native';
import { fromNegErrno } from './errors';

interface Pending { resolve(n: number): void; reject(e: Error): void; what: string }
interface Op { op: number; flags: number; fd: number; len: number; bufOffset: number; fileOffset: number; p: Pending }

export class Uring {
  private ring: NativeRing;
  private sq: DataView;
  private cq: DataView;
  private readonly cap: number;
  private head = 0; // next SQ slot to fill
  private queued: Op[] = [];
  private pending = new Map<number, Pending>();
  private nextId = 1;
  private flushScheduled = false;
  private closed = false;
  readonly maxInflight: number;
  readonly fixed: boolean;
  stats = { submitted: 0, completed: 0, batches: 0, watchdogReaps: 0 };

  /** `region` is [offset, length) of `memory` that all buffers come from. */
  constructor(memory: WebAssembly.Memory, region: { offset: number; length: number }, entries = 256) {
    const native = loadNative();
    this.cap = entries * 2;
    this.maxInflight = entries * 2;
    const sqBuf = new SharedArrayBuffer(this.cap * SQ_ENTRY);
    const cqBuf = new SharedArrayBuffer(this.cap * 2 * CQ_ENTRY);
    this.sq = new DataView(sqBuf);
    this.cq = new DataView(cqBuf);
    this.ring = new native.Ring(entries, sqBuf, cqBuf, (n: number) => this.onComplete(n));
    this.ring.addRegion(memory.buffer as unknown as SharedArrayBuffer, region.offset, region.length);
    // Registration can fail for non-root users with a small RLIMIT_MEMLOCK;
    // the addon then falls back to plain READ/WRITE on the same memory.
    this.fixed = this.ring.registerRegions() === 0;
    this.regionOffset = region.offset;
  }
  private readonly regionOffset: number;

  read(fd: number, fileOffset: number, len: number, ptr: number): Promise<number> {
    return this.push(OP.READ, FLAG_FIXED, fd, len, ptr - this.regionOffset, fileOffset, 'read');
  }

  write(fd: number, fileOffset: number, len: number, ptr: number): Promise<number> {
    return this.push(OP.WRITE, FLAG_FIXED, fd, len, ptr - this.regionOffset, fileOffset, 'write');
  }

  /** Reads exactly len bytes (short reads past EOF of a sparse file are zero-filled by the caller). */
  async readFull(fd: number, fileOffset: number, len: number, ptr: number): Promise<number> {
    let got = 0;
    while (got < len) {
      const n = await this.read(fd, fileOffset + got, len - got, ptr + got);
      if (n === 0) break;
      got += n;
    }
    return got;
  }

  async writeFull(fd: number, fileOffset: number, len: number, ptr: number): Promise<void> {
    let put = 0;
    while (put < len) {
      const n = await this.write(fd, fileOffset + put, len - put, ptr + put);
      if (n === 0) throw fromNegErrno(-28, 'write made no progress');
      put += n;
    }
  }

  fsync(fd: number, dataOnly = true): Promise<number> {
    return this.push(dataOnly ? OP.FDATASYNC : OP.FSYNC, 0, fd, 0, 0, 0, 'fsync');
  }

  /** Deallocates a range (reads back as zeros), keeping the file size. */
  punch(fd: number, fileOffset: number, len: number): Promise<number> {
    return this.push(OP.FALLOCATE, FLAG_PUNCH, fd, 0, len, fileOffset, 'punch');
  }

  zeroRange(fd: number, fileOffset: number, len: number): Promise<number> {
    return this.push(OP.FALLOCATE, FLAG_ZERO_RANGE, fd, 0, len, fileOffset, 'zero range');
  }

  get inflight(): number { return this.pending.size; }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.ring.close();
    for (const p of this.pending.values()) p.reject(fromNegErrno(-108, 'io_uring closed'));
    this.pending.clear();
  }

  private push(op: number, flags: number, fd: number, len: number, bufOffset: number, fileOffset: number, what: string): Promise<number> {
    if (this.closed) return Promise.reject(fromNegErrno(-108, `${what} on a closed ring`));
    return new Promise<number>((resolve, reject) => {
      this.queued.push({ op, flags, fd, len, bufOffset, fileOffset, p: { resolve, reject, what } });
      if (!this.flushScheduled) {
        this.flushScheduled = true;
        // Collect everything issued in this turn and submit it in one call.
        queueMicrotask(() => this.flush());
      }
    });
  }

  private flush(): void {
    this.flushScheduled = false;
    const room = this.maxInflight - this.pending.size;
    const n = Math.min(room, this.queued.length, this.cap);
    if (n <= 0) return;
    const start = this.head;
    for (let i = 0; i < n; i++) {
      const o = this.queued[i];
      const id = this.nextId;
      this.nextId = this.nextId >= 0x7fffffff ? 1 : this.nextId + 1;
      const at = ((this.head + i) % this.cap) * SQ_ENTRY;
      const v = this.sq;
      v.setUint8(at, o.op);
      v.setUint8(at + 1, o.flags);
      v.setUint16(at + 2, 0, true);
      v.setInt32(at + 4, o.fd, true);
      v.setUint32(at + 8, o.len, true);
      v.setUint32(at + 12, id, true);
      setU64(v, at + 16, o.bufOffset);
      setU64(v, at + 24, o.fileOffset);
      this.pending.set(id, o.p);
    }
    this.queued.splice(0, n);
    this.head = (this.head + n) % this.cap;
    this.stats.submitted += n;
    this.stats.batches++;
    // Ops the kernel finished inline (page-cache hits) come back at once,
    // without an eventfd wake-up and another loop turn.
    const done = this.ring.submitReap(start, n);
    if (done) this.onComplete(done);
    this.armWatchdog();
  }

  /**
   * Safety net for the eventfd wake-up: under some kernel/libuv pairs (seen
   * with Debian 6.12 and 7.3 guests, where libuv drives epoll through its own
   * io_uring) the eventfd registered with our ring never wakes the loop,
   * although the completions are posted. While anything is in flight, a
   * coarse timer peeks at the completion queue (no syscall).
   */
  private watchdog: NodeJS.Timeout | null = null;
  private armWatchdog(): void {
    if (this.watchdog || this.pending.size === 0 || this.closed) return;
    this.watchdog = setTimeout(() => {
      this.watchdog = null;
      if (this.closed) return;
      const n = this.ring.reap();
      if (n) { this.stats.watchdogReaps++; this.onComplete(n); }
      this.armWatchdog();
    }, 2);
    this.watchdog.unref();
  }

  private onComplete(n: number): void {
    const v = this.cq;
    for (let i = 0; i < n; i++) {
      const id = v.getUint32(i * CQ_ENTRY, true);
      const res = v.getInt32(i * CQ_ENTRY + 4, true);
      const p = this.pending.get(id);
      if (!p) continue;
      this.pending.delete(id);
      if (res < 0) p.reject(fromNegErrno(res, p.what));
      else p.resolve(res);
    }
    this.stats.completed += n;
    if (this.queued.length) this.flush();
  }
}

function setU64(v: DataView, at: number, x: number): void {
  v.setUint32(at, x >>> 0, true);
  v.setUint32(at + 4, Math.floor(x / 0x100000000), true);
}
