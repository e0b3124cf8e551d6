// I/O buffers of one I/O worker: ArrayBuffer chunks, each a region of the
// worker's ring, carved into power-of-two slots kept on free lists per
// size. Not shared: only this thread touches them, and V8 copies and fills
// shared memory with relaxed atomics (the copy of 4 KiB read replies into
// the staging buffer was 12% of the worker's time). A slot is a number:
// chunk * CHUNK + offset. Chunks are added as needed up to a limit and never
// given back; the bytes in use at the worst moment stay reserved, and the
// limit bounds them (callers wait when alloc fails: back-pressure, not
// unbounded memory).
export const CHUNK = 64 << 20;
const MIN_SHIFT = 12; // 4 KiB
const CLASSES = 27 - MIN_SHIFT; // 4 KiB .. 64 MiB
const UNIT = 1 << MIN_SHIFT;
const UNITS = CHUNK / UNIT;
const FREE = 255;

export class Slabs {
  readonly chunks: Buffer[] = [];
  private free: number[][] = Array.from({ length: CLASSES }, () => []);
  private bump = CHUNK; // offset in the last chunk (CHUNK: none yet)
  // Size class of each live slot, by 4 KiB unit (255: free).
  private classes = new Uint8Array(0);
  inUse = 0;

  constructor(private readonly maxChunks: number, private readonly onChunk: (ab: ArrayBuffer) => void) {}

  /** A slot of at least `bytes` (≤ CHUNK), or -1 when the limit is reached. */
  alloc(bytes: number): number {
    const c = classOf(bytes);
    const size = 1 << (c + MIN_SHIFT);
    let slot = this.free[c].pop();
    if (slot === undefined) {
      if (this.bump + size > CHUNK) {
        if (this.chunks.length >= this.maxChunks) return -1;
        const ab = new ArrayBuffer(CHUNK);
        this.chunks.push(Buffer.from(ab));
        const grown = new Uint8Array(this.chunks.length * UNITS).fill(FREE);
        grown.set(this.classes);
        this.classes = grown;
        this.onChunk(ab);
        this.bump = 0;
      }
      slot = (this.chunks.length - 1) * CHUNK + this.bump;
      this.bump += size;
    }
    this.classes[slot / UNIT] = c;
    this.inUse += size;
    return slot;
  }

  release(slot: number): void {
    const c = this.classes[slot / UNIT];
    if (c === FREE || c === undefined) throw new Error(`slot ${slot} is not allocated`);
    this.classes[slot / UNIT] = FREE;
    this.inUse -= 1 << (c + MIN_SHIFT);
    this.free[c].push(slot);
  }

  /** The chunk (a Buffer) and the offset in it of a slot. */
  buf(slot: number): Buffer { return this.chunks[Math.floor(slot / CHUNK)]; }
}

export const chunkOf = (slot: number): number => Math.floor(slot / CHUNK);
export const offsetOf = (slot: number): number => slot % CHUNK;

function classOf(bytes: number): number {
  if (bytes > CHUNK) throw new RangeError(`${bytes} bytes exceed one ${CHUNK}-byte chunk`);
  let c = 0;
  while ((1 << (c + MIN_SHIFT)) < bytes) c++;
  return c;
}
