// Block-range reader/writer locks for one device. A request waits only for
// earlier requests that overlap it and conflict (either side writes), in
// arrival order: reads never see half of a concurrent write (H1), sub-block
// read-modify-write is serialized per block (H15), and since nobody waits for
// a later request there is no deadlock.

interface Entry { start: number; end: number; excl: boolean; done: Promise<void>; release(): void }

export class RangeLock {
  private entries: Entry[] = [];

  /** Lock blocks [start, end); resolves to the release function. */
  acquire(start: number, end: number, excl: boolean): Promise<() => void> | (() => void) {
    const blockers: Promise<void>[] = [];
    for (const e of this.entries) {
      if (e.start < end && start < e.end && (excl || e.excl)) blockers.push(e.done);
    }
    let release!: () => void;
    const done = new Promise<void>((r) => { release = r; });
    const entry: Entry = { start, end, excl, done, release };
    this.entries.push(entry);
    let released = false;
    const unlock = () => {
      if (released) return;
      released = true;
      const i = this.entries.indexOf(entry);
      if (i >= 0) this.entries.splice(i, 1);
      entry.release();
    };
    // Fast path: nothing to wait for, no extra promise hop.
    if (blockers.length === 0) return unlock;
    return Promise.all(blockers).then(() => unlock);
  }

  get size(): number { return this.entries.length; }
}
