// The engine's side of a device's gate and stripes (assembly/gate.ts), which
// the I/O workers take per request. They serve a device's reads and writes
// of blocks whose place is already known, planning from the same shared
// tables the engine keeps. Every engine request and every change of those
// tables goes through the gate:
//   - as a writer (engine writes, zeroing, snapshot freeze/rebase, close):
//     no worker request starts until exit, and entry waits for those in flight;
//   - as a reader (engine reads): worker writes are kept out, so an engine
//     read never sees half of a worker's write (H1).
// Workers meeting a closed gate hand the request to the engine instead of
// waiting, so the gate never deadlocks against them.
// Engine reads, writes and zeroing do not close the gate: they take the
// stripes of their own blocks (striped()), so workers elsewhere on the
// device keep running. Closing the gate for each of them sent every worker
// request in flight meanwhile to the engine too, which then closed the gate
// again: under load the device fell back to the engine for good.
import type { SharedHeap } from './wasm';
import { layout } from './wasm';

/** Service-time histogram of the requests the I/O workers served: counts per bucket (upper bounds in ns; the last bucket is unbounded). */
export interface GateLatency { counts: number[]; sumNs: number }

/** What the I/O workers did for a device. */
export interface GateStats {
  fastReads: number; fastWrites: number; slowPlans: number; readBytes: number; writeBytes: number;
  /** Of slowPlans: the engine held the device gate / a stripe was busy. */
  slowGate?: number; slowBusy?: number;
  latency?: { boundsNs: number[]; read: GateLatency; write: GateLatency };
}

/** How often a retired gate checks whether its last channel let go. */
const RETIRE_POLL_MS = 1000;

export class DeviceGate {
  /** The gate record's heap offset: what a channel serving the device is given (IoWorkers.open). */
  readonly ptr: number;
  private readonly bs: number;

  constructor(private readonly heap: SharedHeap, size: number, blockSize: number) {
    this.ptr = heap.alloc(layout().GATE_BYTES);
    this.bs = blockSize;
    heap.wasm.gateInit(this.ptr, size);
  }

  /** Runs fn inside the gate. Worker requests last one I/O each, so the wait is short. */
  async gated<T>(writer: boolean, fn: () => T | Promise<T>): Promise<T> {
    // Entered synchronously when no worker request is in flight (fn then
    // starts in this tick: Device.gate() publishes its first view that way).
    const wait = this.enter(writer);
    if (wait) await wait;
    try { return await fn(); } finally { this.heap.wasm.gateExit(this.ptr, writer ? 1 : 0); }
  }

  /**
   * Runs fn holding the stripes of [offset, offset+length): worker requests
   * on those blocks are done and new ones go to the engine until it ends.
   * Stripes held by workers are released after one I/O; if they keep being
   * taken, fall back to the whole gate (which new requests cannot pass).
   */
  async striped<T>(offset: number, length: number, exclusive: boolean, fn: () => T | Promise<T>): Promise<T> {
    for (let tries = 0; !this.lockRange(offset, length, exclusive); tries++) {
      if (tries >= 100) return this.gated(exclusive, fn);
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    try { return await fn(); } finally { this.unlockRange(offset, length); }
  }

  /** Tries to take the stripes of [offset, offset+length) (widened to blocks); false when a worker request holds one. */
  lockRange(offset: number, length: number, exclusive: boolean): boolean {
    return !!this.heap.wasm.gateLockRange(this.ptr, offset, length, exclusive ? 1 : 0, this.bs);
  }

  unlockRange(offset: number, length: number): void { this.heap.wasm.gateUnlockRange(this.ptr, offset, length, this.bs); }

  /**
   * Enters as a writer for good (device closed): every request goes to the
   * engine. The record is freed once no channel holds it any more.
   */
  async close(): Promise<void> {
    await this.enter(true);
    this.publish(0);
    this.retire();
  }

  /** Holds the gate as a writer (workers drained and kept out) until the returned function is called. */
  async hold(): Promise<() => void> {
    await this.enter(true);
    let open = true;
    return () => { if (open) { open = false; this.heap.wasm.gateExit(this.ptr, 1); } };
  }

  /** Publishes the device's view record (src/device-view.ts; 0: none); call inside gated(true, ...). */
  publish(viewRecord: number): void {
    if (!this.heap.wasm.gateSetView(this.ptr, viewRecord)) throw new Error('device gate: the view changes only with the gate held as a writer and the workers drained');
  }

  stats(): GateStats {
    const w = this.heap.wasm, l = layout(), g = this.ptr, n = l.GATE_LAT_BUCKETS;
    const stat = (i: number) => w.gateStat(g, i);
    const side = (k: number) => ({
      counts: Array.from({ length: n }, (_, i) => stat(l.GS_LAT + k * n + i)),
      sumNs: stat(l.GS_LAT_SUM + k),
    });
    return {
      fastReads: stat(l.GS_FAST_READS), fastWrites: stat(l.GS_FAST_WRITES), slowPlans: stat(l.GS_SLOW_PLANS),
      slowGate: stat(l.GS_SLOW_GATE), slowBusy: stat(l.GS_SLOW_BUSY),
      readBytes: stat(l.GS_READ_BYTES), writeBytes: stat(l.GS_WRITE_BYTES),
      latency: { boundsNs: Array.from({ length: n - 1 }, (_, i) => w.gateLatBound(i)), read: side(0), write: side(1) },
    };
  }

  /** Enters; undefined when already drained, else resolves once the workers are. */
  private enter(writer: boolean): Promise<void> | undefined {
    return this.heap.wasm.gateEnter(this.ptr, writer ? 1 : 0) ? undefined : this.drain(writer);
  }

  private drain(writer: boolean): Promise<void> {
    return new Promise((resolve) => {
      const poll = () => (this.heap.wasm.gateDrained(this.ptr, writer ? 1 : 0) ? resolve() : setImmediate(poll));
      setImmediate(poll);
    });
  }

  // The device lets go; channels that still hold the record (an NBD
  // connection the client keeps open) each let go as they close.
  private retire(): void {
    const w = this.heap.wasm;
    if (w.gateDrop(this.ptr) === 0) { this.heap.free(this.ptr); return; }
    const t = setInterval(() => {
      if (w.gateRefs(this.ptr) !== 0) return;
      clearInterval(t);
      this.heap.free(this.ptr);
    }, RETIRE_POLL_MS);
    t.unref();
  }
}
