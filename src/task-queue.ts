// The worker pool's queue of waiting tasks: by priority (a reader's demand
// miss before readahead before boot-profile prefetch, as the fetch queue
// starts their store reads), FIFO within one. Without it a guest's miss that
// reached the CPU behind a dozen prefetched frames waited for all of their
// decompression: prefetch delayed demand after all.
import type { TaskQueue } from 'piscina';
import { Priority } from './fetch-queue';

type QueuedTask = Parameters<TaskQueue['push']>[0];

/** A task's priority: its payload's `prio` (fetch-queue Priority); anything else is demand. */
function prioOf(t: QueuedTask): Priority {
  const p = (t as { task?: { prio?: unknown } }).task?.prio;
  return p === Priority.Readahead || p === Priority.Prefetch ? p : Priority.Demand;
}

export class PriorityTaskQueue implements TaskQueue {
  private readonly queues: QueuedTask[][] = [[], [], []];

  get size(): number { return this.queues[0].length + this.queues[1].length + this.queues[2].length; }
  push(t: QueuedTask): void { this.queues[prioOf(t)].push(t); }
  shift(): QueuedTask | null {
    for (const q of this.queues) if (q.length) return q.shift()!;
    return null;
  }
  remove(t: QueuedTask): void {
    for (const q of this.queues) {
      const i = q.indexOf(t);
      if (i >= 0) { q.splice(i, 1); return; }
    }
  }
}
