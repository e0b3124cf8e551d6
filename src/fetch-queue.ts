// How many frame fetches from the object store run at once on this host, and
// in which order they start: demand misses (a reader waits) before
// readahead before profile prefetch, FIFO within a class. Background classes
// never take the last slots, so a guest's miss starts at once even while a
// boot profile is being prefetched; a queued background fetch that a reader
// comes to need is promoted to demand.

export const enum Priority { Demand = 0, Readahead = 1, Prefetch = 2 }

export interface Ticket { prio: Priority }

interface Waiter { ticket: Ticket; start: (background: boolean) => void }

export class FetchQueue {
  private running = 0;
  private runningBackground = 0;
  private readonly queues: Waiter[][] = [[], [], []];
  readonly stats = { started: [0, 0, 0], promoted: 0, peakRunning: 0 };

  /** `limit`: fetches at once; `reserve`: slots only demand may take. */
  constructor(readonly limit: number, readonly reserve = limit > 1 ? Math.max(1, Math.floor(limit / 4)) : 0) {
    if (!Number.isSafeInteger(limit) || limit < 1) throw new RangeError(`fetch concurrency must be a positive integer, not ${limit}`);
  }

  /** Waits for a slot; the returned function gives it back. */
  acquire(ticket: Ticket): Promise<() => void> {
    return new Promise((resolve) => {
      const w: Waiter = { ticket, start: (background) => resolve(this.release(background)) };
      this.queues[ticket.prio].push(w);
      this.pump();
    });
  }

  /** Moves a queued ticket to a more urgent class (no-op once it started). */
  promote(ticket: Ticket, prio: Priority): void {
    if (prio >= ticket.prio) return;
    const q = this.queues[ticket.prio];
    const k = q.findIndex((w) => w.ticket === ticket);
    if (k < 0) return;
    ticket.prio = prio;
    const [w] = q.splice(k, 1);
    this.queues[prio].push(w);
    this.stats.promoted++;
    this.pump();
  }

  get queued(): number { return this.queues.reduce((n, q) => n + q.length, 0); }
  get active(): number { return this.running; }

  private release(background: boolean): () => void {
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.running--;
      if (background) this.runningBackground--;
      this.pump();
    };
  }

  private pump(): void {
    while (this.running < this.limit) {
      let w = this.queues[Priority.Demand].shift();
      const background = !w;
      if (!w && this.runningBackground < this.limit - this.reserve) {
        w = this.queues[Priority.Readahead].shift() ?? this.queues[Priority.Prefetch].shift();
      }
      if (!w) return;
      this.running++;
      if (background) this.runningBackground++;
      this.stats.started[w.ticket.prio]++;
      this.stats.peakRunning = Math.max(this.stats.peakRunning, this.running);
      w.start(background);
    }
  }
}
