// The I/O arena: the registered slice of shared memory every io_uring data
// buffer comes from. acquire() waits when it is exhausted, which is what
// bounds memory under load (backpressure instead of unbounded queues).
import { RangeAllocator } from './alloc';
import { einval } from './errors';

// Request buffers are mostly a few sizes (4 KiB, 128 KiB, 1 MiB); freed
// blocks of those sizes are kept on per-size stacks, so the hot path is a
// push/pop rather than a first-fit walk with array splices.
const CACHED_SIZES = new Set([4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576]);
const MAX_CACHED_BYTES_PER_SIZE = 4 * 1024 * 1024;

export class IoArena {
  private readonly alloc: RangeAllocator;
  private waiters: Array<{ bytes: number; resolve(p: number): void }> = [];
  private free = new Map<number, number[]>();
  private cachedBytes = 0;

  constructor(readonly offset: number, readonly length: number) {
    this.alloc = new RangeAllocator(offset, length);
  }

  get used(): number { return this.alloc.used - this.cachedBytes; }

  acquire(bytes: number): Promise<number> {
    if (bytes > this.length) return Promise.reject(einval(`I/O buffer of ${bytes} bytes exceeds the ${this.length}-byte arena`));
    if (this.waiters.length === 0) {
      const p = this.tryAlloc(bytes);
      if (p >= 0) return Promise.resolve(p);
    }
    return new Promise((resolve) => this.waiters.push({ bytes, resolve }));
  }

  private tryAlloc(bytes: number): number {
    const n = Math.ceil(bytes / 4096) * 4096;
    const stack = this.free.get(n);
    if (stack && stack.length) { this.cachedBytes -= n; return stack.pop()!; }
    let p = this.alloc.alloc(n);
    if (p < 0 && this.cachedBytes > 0) { this.dropCache(); p = this.alloc.alloc(n); }
    return p;
  }

  /** Returns cached blocks to the allocator so they can coalesce. */
  private dropCache(): void {
    for (const stack of this.free.values()) for (const p of stack.splice(0)) this.alloc.release(p);
    this.cachedBytes = 0;
  }

  release(ptr: number): void {
    // The allocator's own record of the block's size: a separate map here
    // once went stale and put a block reused at another size on the wrong
    // stack (overlapping buffers).
    const n = this.alloc.sizeOf(ptr);
    if (n !== undefined && CACHED_SIZES.has(n) && this.waiters.length === 0) {
      let stack = this.free.get(n);
      if (!stack) { stack = []; this.free.set(n, stack); }
      if (stack.length * n < MAX_CACHED_BYTES_PER_SIZE) { stack.push(ptr); this.cachedBytes += n; return; }
    }
    this.alloc.release(ptr);
    // FIFO: the oldest waiter goes first so big requests are not starved.
    while (this.waiters.length) {
      const p = this.tryAlloc(this.waiters[0].bytes);
      if (p < 0) break;
      this.waiters.shift()!.resolve(p);
    }
  }
}
