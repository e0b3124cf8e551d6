// The engine's side of the gate the I/O workers plan under (native/device_target.h).
// Native frontends (NBD connections, ublk queues) serve a device's reads and
// writes of blocks whose place is already known without entering JS; they
// plan from the same shared-memory tables the engine keeps. Every engine
// request and every change of those tables goes through the gate:
//   - as a writer (engine writes, zeroing, snapshot freeze/rebase, close):
//     no native request runs until exit, and entry waits for those in flight;
//   - as a reader (engine reads): native writers are kept out, so an engine
//     read never sees half of a native write (H1).
// Natives meeting a closed gate take the slow path (the engine) instead of
// waiting, so the gate never deadlocks against them.
// Engine reads, writes and zeroing do not close the gate: they take the
// stripes of their own blocks (striped()), so natives elsewhere on the
// device keep running. Closing the gate for each of them sent every native
// request in flight meanwhile to the engine too, which then closed the gate
// again: under load the device fell back to the slow path for good.
import { loadNative, type NativeDeviceTarget } from './native';
import type { SharedHeap } from './wasm';

export class NativePlane {
  readonly target: NativeDeviceTarget;

  constructor(heap: SharedHeap, size: number, blockSize: number) {
    this.target = new (loadNative().DeviceTarget)(heap.buffer, size, blockSize);
  }

  /** Runs fn inside the gate. Native requests last one I/O each, so the wait is short. */
  async gated<T>(writer: boolean, fn: () => T | Promise<T>): Promise<T> {
    // Entered synchronously when no native request is in flight (fn then
    // starts in this tick: nativeTarget() publishes its first view that way).
    const wait = this.enter(writer);
    if (wait) await wait;
    try { return await fn(); } finally { this.target.exit(writer); }
  }

  /**
   * Runs fn holding the stripes of [offset, offset+length): native requests
   * on those blocks are done and new ones take the slow path until it ends.
   * Stripes held by natives are released after one I/O; if they keep being
   * taken, fall back to the whole gate (which new natives cannot pass).
   */
  async striped<T>(offset: number, length: number, exclusive: boolean, fn: () => T | Promise<T>): Promise<T> {
    for (let tries = 0; !this.target.lockRange(offset, length, exclusive); tries++) {
      if (tries >= 100) return this.gated(exclusive, fn);
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    try { return await fn(); } finally { this.target.unlockRange(offset, length); }
  }

  /** Enters as a writer for good (device closed): natives always take the slow path. */
  async closeGate(): Promise<void> {
    await this.enter(true);
    this.target.setView(null);
  }

  /** Holds the gate as a writer (natives drained and kept out) until the returned function is called. */
  async hold(): Promise<() => void> {
    await this.enter(true);
    let open = true;
    return () => { if (open) { open = false; this.target.exit(true); } };
  }

  /** Enters; undefined when already drained, else resolves once the natives are. */
  private enter(writer: boolean): Promise<void> | undefined {
    return this.target.enter(writer) ? undefined : this.drain(writer);
  }

  /** Publishes the device's view record (src/device-view.ts); call inside gated(true, ...). */
  publish(viewRecord: number): void { this.target.setView(viewRecord); }

  private drain(writer: boolean): Promise<void> {
    return new Promise((resolve) => {
      const poll = () => (this.target.drained(writer) ? resolve() : setImmediate(poll));
      setImmediate(poll);
    });
  }
}
