// Promise API over the native io_uring ring. Requests are encoded as 32-byte
// descriptors straight into a SharedArrayBuffer the addon reads, and are
// submitted in one native call per event-loop turn; completions arrive in
// batches (one native->JS call per eventfd wake-up). Data buffers are offsets
// into one registered region of the shared WASM memory (READ_FIXED /
// WRITE_FIXED), so the kernel moves bytes straight into memory the WASM state
// machine and the workers can see.
import { loadNative, NativeRing, OP, FLAG_FIXED, FLAG_PUNCH, FLAG_ZERO_RANGE, SQ_ENTRY, CQ_ENTRY, writeDesc, type Desc } from './native';
import { fromNegErrno } from './errors';

interface Pending { resolve(n: number): void; reject(e: Error): void; what: string }
/** A queued request: the descriptor fields (id set at submit) plus its promise. */
interface Op extends Desc { p: Pending }

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
  /**
   * `wakeups`: batches delivered by the eventfd wake-up (the ring's
   * onComplete); `watchdogReaps`: batches only the last-resort watchdog
   * delivered (see armWatchdog; stays 0 while the wake-up works).
   */
  stats = { submitted: 0, completed: 0, batches: 0, wakeups: 0, watchdogReaps: 0 };

  /** `region` is [offset, length) of `memory` that all buffers come from. */
  constructor(memory: WebAssembly.Memory, region: { offset: number; length: number }, entries = 256) {
    const native = loadNative();
    this.cap = entries * 2;
    this.maxInflight = entries * 2;
    const sqBuf = new SharedArrayBuffer(this.cap * SQ_ENTRY);
    const cqBuf = new SharedArrayBuffer(this.cap * 2 * CQ_ENTRY);
    this.sq = new DataView(sqBuf);
    this.cq = new DataView(cqBuf);
    this.ring = new native.Ring(entries, sqBuf, cqBuf, (n: number) => { this.stats.wakeups++; this.onComplete(n); });
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
    if (this.watchdog) { clearTimeout(this.watchdog); this.watchdog = null; }
    this.ring.close();
    for (const p of this.pending.values()) p.reject(fromNegErrno(-108, 'io_uring closed'));
    this.pending.clear();
  }

  private push(op: number, flags: number, fd: number, len: number, bufOffset: number, fileOffset: number, what: string): Promise<number> {
    if (this.closed) return Promise.reject(fromNegErrno(-108, `${what} on a closed ring`));
    return new Promise<number>((resolve, reject) => {
      this.queued.push({ op, flags, bufIndex: 0, fd, len, id: 0, bufOffset, fileOffset, p: { resolve, reject, what } });
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
      o.id = id;
      writeDesc(this.sq, this.head + i, this.cap, o);
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
   * Last resort behind the eventfd wake-up, which is what delivers async
   * completions (the ring's onComplete). It reaps only completions that sat
   * in the CQ through a whole tick while none were delivered, i.e. only if
   * that wake-up were really lost, and says so once (process warning).
   *
   * It used to peek every 2 ms and reap whatever it found. In QEMU guests
   * (Debian 6.12/7.3) I/O and JS are slow enough that the timer was often
   * due by the time a completion's eventfd was readable, and libuv runs due
   * timers before it polls: the timer took completions the eventfd had
   * announced, and its reap count suggested a broken wake-up where there was
   * none (with it disabled, every completion arrived through the eventfd).
   * The only stall reproduced in those guests was test/vm/nbd-kernel.ts
   * writing to the NBD-mounted filesystem with synchronous fs calls from the
   * process serving the device, a deadlock with the main thread blocked
   * (fixed in 471256e). The suspected cause, libuv driving epoll through its
   * own io_uring, does not apply to Node 20's libuv by default: Node ships
   * its io_uring disabled (UV_USE_IO_URING=1 turns it on), and with it on
   * the eventfd path works as well. test/vm/uring-wakeup.ts checks that this
   * watchdog stays idle in those guests.
   */
  private watchdog: NodeJS.Timeout | null = null;
  /** stats.completed when the last tick found completions waiting, else -1. */
  private wdMark = -1;
  private wdWarned = false;
  private armWatchdog(): void {
    if (this.watchdog || this.pending.size === 0 || this.closed) return;
    this.watchdog = setTimeout(() => this.watchdogTick(), WATCHDOG_TICK_MS);
    this.watchdog.unref();
  }

  private watchdogTick(): void {
    this.watchdog = null;
    if (this.closed) return;
    if (this.ring.ready === 0) {
      this.wdMark = -1;
    } else if (this.wdMark !== this.stats.completed) {
      this.wdMark = this.stats.completed; // first sighting: the wake-up has a tick to deliver them
    } else {
      this.wdMark = -1;
      const n = this.ring.reap();
      if (n) {
        this.stats.watchdogReaps++;
        if (!this.wdWarned) {
          this.wdWarned = true;
          process.emitWarning(`io_uring completions sat unreaped for ${WATCHDOG_TICK_MS} ms: the eventfd wake-up ` +
            'did not deliver them and the watchdog did (expect added latency)', { code: 'STRATA_URING_WATCHDOG' });
        }
        this.onComplete(n);
      }
    }
    this.armWatchdog();
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

/** Watchdog period; it reaps completions left waiting through a whole tick. */
const WATCHDOG_TICK_MS = 20;

