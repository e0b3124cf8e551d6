// First-fit allocator over a byte range of the shared WASM memory. The host
// owns the memory layout (the WASM side allocates nothing), so state tables,
// mapping arrays and I/O buffers all come from here. Every block is aligned to
// `align` (4 KiB by default: O_DIRECT and io_uring fixed buffers want pages).

export class RangeAllocator {
  // Free list of [offset, length] sorted by offset, coalesced on free.
  private free: Array<[number, number]>;
  private sizes = new Map<number, number>();
  used = 0;

  constructor(readonly base: number, readonly size: number, readonly align = 4096,
    private readonly onGrow?: (needEnd: number) => boolean) {
    this.free = size > 0 ? [[base, size]] : [];
  }

  get end(): number { return this.base + this.size; }

  /** Offset of `bytes` (rounded up to the alignment), or -1 when exhausted. */
  alloc(bytes: number): number {
    const n = Math.max(this.align, Math.ceil(bytes / this.align) * this.align);
    for (let i = 0; i < this.free.length; i++) {
      const [off, len] = this.free[i];
      if (len < n) continue;
      if (len === n) this.free.splice(i, 1);
      else this.free[i] = [off + n, len - n];
      this.sizes.set(off, n);
      this.used += n;
      return off;
    }
    if (this.onGrow && this.onGrow(this.end + n)) {
      // The owner extended the range: add the new tail and retry once.
      return this.alloc(bytes);
    }
    return -1;
  }

  /** Called by the owner after the underlying memory grew. */
  extend(newSize: number): void {
    if (newSize <= this.size) return;
    const add: [number, number] = [this.end, newSize - this.size];
    (this as { size: number }).size = newSize;
    this.insertFree(add[0], add[1]);
  }

  /** Size of the live block at `off` (as rounded by alloc), or undefined. */
  sizeOf(off: number): number | undefined { return this.sizes.get(off); }

  release(off: number): void {
    const n = this.sizes.get(off);
    if (n === undefined) throw new Error(`RangeAllocator: double free or foreign offset ${off}`);
    this.sizes.delete(off);
    this.used -= n;
    this.insertFree(off, n);
  }

  private insertFree(off: number, n: number): void {
    const f = this.free;
    let i = 0;
    while (i < f.length && f[i][0] < off) i++;
    f.splice(i, 0, [off, n]);
    if (i + 1 < f.length && f[i][0] + f[i][1] === f[i + 1][0]) { f[i][1] += f[i + 1][1]; f.splice(i + 1, 1); }
    if (i > 0 && f[i - 1][0] + f[i - 1][1] === f[i][0]) { f[i - 1][1] += f[i][1]; f.splice(i, 1); }
  }
}
