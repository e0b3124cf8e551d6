// The main thread's side of a connection whose transmission phase an I/O
// worker serves (transmission.ts): slow requests arrive as messages and are
// taken by the connection, complete replies go back to the worker.
import type { IoWorkers, ToWorker } from '../io/pool';
import { STAT, type SlowRequest, type TransmissionOptions } from './transmission';

/** A slow request as the connection handles it. */
export interface WireRequest { type: number; flags: number; cookie: Buffer; offset: number; length: number; payload: Buffer | null; cost: number }

export interface WireStats { fast: number; slow: number; pendingSlow: number; phase: number; unsentBytes: number }

export class WorkerWire {
  private queue: WireRequest[] = [];
  private readonly counters: Float64Array;
  private readonly ch: { id: number; send(m: ToWorker): void };
  private gone = false;

  /** `fd` becomes the worker's (a duplicate, or one end of a socket pair); `gate`: its device's gate record, 0 for none (every request comes back). */
  constructor(workers: IoWorkers, fd: number, gate: number, opts: TransmissionOptions, initial: Uint8Array,
    onEvent: (kind: 'requests' | 'closed', message: string) => void) {
    const stats = new SharedArrayBuffer(STAT.LENGTH * 8);
    this.counters = new Float64Array(stats);
    this.ch = workers.open(fd, gate, opts, initial, stats, (e) => {
      if (e.t === 'requests') {
        for (const r of e.reqs) this.queue.push(toWire(r));
        onEvent('requests', '');
      } else {
        this.gone = true;
        onEvent('closed', e.reason);
      }
    });
  }

  private get id(): number { return this.ch.id; }

  take(): WireRequest[] { const q = this.queue; this.queue = []; return q; }

  /** Complete replies (whole, never interleaved) and how many slow requests finished; the bytes are copied. */
  reply(bytes: Buffer[] | null, done: number, doneBytes: number): void {
    if (this.gone) return;
    const b = bytes && bytes.length ? Buffer.concat(bytes) : null;
    this.ch.send({ t: 'reply', id: this.id, bytes: b, done, doneBytes });
  }

  shutdown(): void { if (!this.gone) this.ch.send({ t: 'shutdown', id: this.id }); }
  destroy(): void { if (!this.gone) this.ch.send({ t: 'destroy', id: this.id }); }

  stats(): WireStats {
    const c = this.counters;
    return { fast: c[STAT.FAST], slow: c[STAT.SLOW], pendingSlow: c[STAT.PENDING_SLOW], phase: c[STAT.PHASE], unsentBytes: c[STAT.UNSENT] };
  }
}

function toWire(r: SlowRequest): WireRequest {
  return {
    type: r.type, flags: r.flags, cookie: Buffer.from(r.cookie.buffer, r.cookie.byteOffset, 8), offset: r.offset, length: r.length, cost: r.cost,
    payload: r.payload ? Buffer.from(r.payload.buffer, r.payload.byteOffset, r.payload.length) : null,
  };
}
