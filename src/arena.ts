// The I/O arena: the registered slice of shared memory every io_uring data
// buffer comes from. acquire() waits when it is exhausted, which is what
// bounds memory under load (backpressure instead of unbounded queues).
import { RangeAllocator } from './alloc';
import { einval } from './errors';

export class IoArena {
  private readonly alloc: RangeAllocator;
  private waiters: Array<{ bytes: number; resolve(p: number): void }> = [];

  constructor(readonly offset: number, readonly length: number) {
    this.alloc = new RangeAllocator(offset, length);
  }

  get used(): number { return this.alloc.used; }

  acquire(bytes: number): Promise<number> {
    if (bytes > this.length) return Promise.reject(einval(`I/O buffer of ${bytes} bytes exceeds the ${this.length}-byte arena`));
    if (this.waiters.length === 0) {
      const p = this.alloc.alloc(bytes);
      if (p >= 0) return Promise.resolve(p);
    }
    return new Promise((resolve) => this.waiters.push({ bytes, resolve }));
  }

  release(ptr: number): void {
    this.alloc.release(ptr);
    // FIFO: the oldest waiter goes first so big requests are not starved.
    while (this.waiters.length) {
      const p = this.alloc.alloc(this.waiters[0].bytes);
      if (p < 0) break;
      this.waiters.shift()!.resolve(p);
    }
  }
}
