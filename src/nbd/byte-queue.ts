// An input byte queue for a socket: chunks are kept as they arrive and only
// copied when a read spans two of them.
export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0; // read offset into chunks[0]
  length = 0;
  private waiter: { n: number; resolve(): void; reject(e: Error): void } | null = null;
  private ended: Error | null = null;

  push(b: Buffer): void {
    if (b.length === 0) return;
    this.chunks.push(b);
    this.length += b.length;
    if (this.waiter && this.length >= this.waiter.n) { const w = this.waiter; this.waiter = null; w.resolve(); }
  }

  end(err: Error): void {
    this.ended = err;
    if (this.waiter) { const w = this.waiter; this.waiter = null; w.reject(err); }
  }

  /** Resolves once `n` bytes are buffered (handshake phase helper). */
  want(n: number): Promise<void> {
    if (this.length >= n) return Promise.resolve();
    if (this.ended) return Promise.reject(this.ended);
    return new Promise((resolve, reject) => { this.waiter = { n, resolve, reject }; });
  }

  /** Removes and returns the next n bytes (n ≤ length). */
  take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0];
    if (first.length - this.head >= n) {
      const out = first.subarray(this.head, this.head + n);
      this.head += n;
      if (this.head === first.length) { this.chunks.shift(); this.head = 0; }
      this.length -= n;
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let got = 0;
    while (got < n) {
      const c = this.chunks[0];
      const take = Math.min(n - got, c.length - this.head);
      c.copy(out, got, this.head, this.head + take);
      got += take;
      this.head += take;
      if (this.head === c.length) { this.chunks.shift(); this.head = 0; }
    }
    this.length -= n;
    return out;
  }

  /** Drops up to n bytes; returns how many were dropped. */
  skip(n: number): number {
    let left = Math.min(n, this.length);
    const dropped = left;
    while (left > 0) {
      const c = this.chunks[0];
      const take = Math.min(left, c.length - this.head);
      this.head += take;
      left -= take;
      if (this.head === c.length) { this.chunks.shift(); this.head = 0; }
    }
    this.length -= dropped;
    return dropped;
  }
}
