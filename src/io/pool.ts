// The I/O workers: a fixed pool (default one per CPU) of long-lived piscina
// workers, each running one I/O loop (workers/io-worker.ts) that serves many
// channels (NBD connections, ublk queues) through its own io_uring ring. The daemon's threads stay the
// same however many devices are connected. Started on first use.
import * as os from 'os';
import * as path from 'path';
import { MessageChannel, type MessagePort } from 'worker_threads';
import { Piscina } from 'piscina';
import type { SharedHeap } from '../wasm';
import { wake, FIXED_SLOTS } from './loop';
import { loadNative } from '../native';
import type { TransmissionEvent, TransmissionOptions } from '../nbd/transmission';
import type { UblkQueueEvent, UblkQueueSpec } from '../ublk/queue';

/** Messages to a worker (each followed by a wake-up). */
export type ToWorker =
  | { t: 'open'; id: number; fd: number; gate: number; opts: TransmissionOptions; initial: Uint8Array; stats: SharedArrayBuffer }
  | { t: 'reply'; id: number; bytes: Uint8Array | null; done: number; doneBytes: number }
  | { t: 'shutdown' | 'destroy'; id: number }
  | { t: 'ublk-open'; id: number; gate: number; spec: UblkQueueSpec; stats: SharedArrayBuffer }
  | { t: 'ublk-answer'; id: number; tag: number; result: number; data: Uint8Array | null }
  | { t: 'ublk-drop'; id: number }
  | { t: 'stop' };

/** What a worker posts about one of its channels. */
export type WorkerEvent = TransmissionEvent | UblkQueueEvent;

/** A channel on a worker, as its opener sees it. */
export interface OpenChannel { id: number; send(m: ToWorker): void }

const SEG_CAP = 64;
const SEG_SIZE = 24;

interface Worker { port: MessagePort; wakeFd: number; segs: number; channels: number; done: Promise<unknown> }

export interface IoWorkersOptions {
  /** Workers (default: STRATA_IO_WORKERS, else one per CPU). */
  threads?: number;
  /** Buffer memory of each worker, in 64 MiB chunks (default 16: 1 GiB, reserved as used). */
  maxChunks?: number;
  blockSize?: number;
  log?: (msg: string) => void;
}

export class IoWorkers {
  readonly threads: number;
  private readonly pool: Piscina;
  private readonly workers: Worker[] = [];
  private readonly handlers = new Map<number, (e: WorkerEvent) => void>();
  private readonly owner = new Map<number, Worker>();
  // Per worker, known once it is ready: free slots of its ring's sparse
  // table (ublk zero copy) and room in its ring for more fetched ublk tags
  // (each stays in flight while its queue lives).
  private readonly fixedFree: number[] = [];
  private readonly tagsFree: number[] = [];
  private readonly onClose = new Map<number, (e: WorkerEvent) => void>();
  private nextId = 1;
  private closing: Promise<void> | null = null;
  // Set at process exit (see IoLoop's halt): the workers return from their rings.
  private readonly halt = new Int32Array(new SharedArrayBuffer(4));
  private readonly onExit = () => {
    Atomics.store(this.halt, 0, 1);
    for (const w of this.workers) wake(w.wakeFd);
  };
  /** Per worker, once ready: PR_SET_IO_FLUSHER's result for its thread (0, or -errno). */
  readonly ioFlusher: number[] = [];
  /** Resolves once every worker runs its loop (connections handed over earlier wait in its port). */
  readonly ready: Promise<void>;

  constructor(private readonly heap: SharedHeap, opts: IoWorkersOptions = {}) {
    const env = Number(process.env.STRATA_IO_WORKERS);
    this.threads = Math.max(1, opts.threads ?? (env > 0 ? env : os.availableParallelism()));
    this.pool = new Piscina({
      filename: path.join(__dirname, '..', '..', 'workers', 'boot.js'),
      workerData: { memory: heap.memory, module: './io-worker.ts' },
      minThreads: this.threads, maxThreads: this.threads, idleTimeout: Infinity,
    });
    const started: Array<Promise<void>> = [];
    for (let i = 0; i < this.threads; i++) {
      const { port1, port2 } = new MessageChannel();
      const wakeFd = loadNative().eventfd();
      const segs = heap.alloc(SEG_CAP * SEG_SIZE);
      const done = this.pool.run({ port: port2, wakeFd, segs, segCap: SEG_CAP, blockSize: opts.blockSize ?? 4096, maxChunks: opts.maxChunks ?? 16, halt: this.halt },
        { name: 'serve', transferList: [port2] });
      // A loop that died took its connections with it: they are told so.
      done.catch((e: Error) => {
        opts.log?.(`I/O worker ${i} stopped: ${e.message}`);
        for (const [id, ow] of [...this.owner]) if (ow === w) this.deliver({ t: 'closed', id, reason: `I/O worker failed: ${e.message}` });
      });
      const w: Worker = { port: port1, wakeFd, segs, channels: 0, done };
      started.push(new Promise((resolve) => {
        port1.on('message', (e: WorkerEvent | { t: 'ready'; ioFlusher: number; fixedSlots: number; tagSlots: number }) => {
          if (e.t !== 'ready') return this.deliver(e);
          this.ioFlusher[i] = e.ioFlusher;
          this.fixedFree[i] = e.fixedSlots;
          this.tagsFree[i] = e.tagSlots;
          if (e.ioFlusher < 0) opts.log?.(`I/O worker ${i}: PR_SET_IO_FLUSHER refused (errno ${-e.ioFlusher}): its memory reclaim may wait on writeback through the ublk devices it serves`);
          resolve();
        });
      }));
      // Idle workers do not keep the process alive; open channels do (ref()).
      port1.unref();
      this.workers.push(w);
    }
    process.on('exit', this.onExit);
    this.ready = Promise.race([Promise.all(started).then(() => {}), Promise.all(this.workers.map((w) => w.done)).then(() => {})]);
  }

  /**
   * Hands a connection's socket (`fd`, now the worker's) to the least busy
   * worker; `gate` is its device's gate record (assembly/gate.ts; 0: no
   * device, every request goes back), held for the channel until it closes. `events` gets its slow requests and, once, its close.
   */
  open(fd: number, gate: number, opts: TransmissionOptions, initial: Uint8Array, stats: SharedArrayBuffer,
    events: (e: TransmissionEvent) => void): OpenChannel {
    return this.attach(gate, (id) => ({ t: 'open', id, fd, gate, opts, initial, stats }), events as (e: WorkerEvent) => void);
  }

  /**
   * Has the least busy worker serve one ublk queue (src/ublk/queue.ts) of the
   * device whose gate record is `gate` (as open()). `events` gets 'ublk-fetched'
   * once every tag was fetched, its slow requests, and once, its close.
   */
  openUblk(spec: UblkQueueSpec, gate: number, stats: SharedArrayBuffer, events: (e: UblkQueueEvent) => void): OpenChannel {
    const i = this.placeUblk(spec.depth, spec.zeroCopy, this.tagsFree, this.fixedFree, this.workers.map((w) => w.channels));
    if (i < 0) {
      throw Object.assign(new Error(`no I/O worker has room for ${spec.depth} more ublk tags${spec.zeroCopy ? ` with zero-copy buffer slots (${FIXED_SLOTS} per worker)` : ''}; use fewer tags${spec.zeroCopy ? ', user copy' : ''} or more workers`),
        { code: 'ENOSPC', errno: os.constants.errno.ENOSPC });
    }
    return this.attach(gate, (id) => ({ t: 'ublk-open', id, gate, spec, stats }), events as (e: WorkerEvent) => void, this.workers[i], (e) => {
      // A dropped queue's commands (and their slots) stay with the ring until it closes.
      if ((e as { slotsKept?: boolean }).slotsKept) return;
      this.tagsFree[i] += spec.depth;
      if (spec.zeroCopy) this.fixedFree[i] += spec.depth;
    });
  }

  /**
   * Whether `queues` more ublk queues of `depth` tags (zero copy: each tag
   * with a slot of a ring's sparse table) fit on the workers now (once
   * ready), dealt as openUblk deals them.
   */
  ublkRoom(queues: number, depth: number, zeroCopy: boolean): boolean {
    const tags = [...this.tagsFree], fixed = [...this.fixedFree], load = this.workers.map((w) => w.channels);
    for (let q = 0; q < queues; q++) if (this.placeUblk(depth, zeroCopy, tags, fixed, load) < 0) return false;
    return true;
  }

  /**
   * Where a ublk queue goes: the least busy worker whose ring has room for
   * every tag (and zero-copy slots); its room and load are taken from the
   * arrays given. -1: none.
   */
  private placeUblk(depth: number, zeroCopy: boolean, tags: number[], fixed: number[], load: number[]): number {
    let best = -1;
    for (let i = 0; i < tags.length; i++) {
      if (tags[i] >= depth && (!zeroCopy || fixed[i] >= depth) && (best < 0 || load[i] < load[best])) best = i;
    }
    if (best >= 0) {
      tags[best] -= depth;
      if (zeroCopy) fixed[best] -= depth;
      load[best]++;
    }
    return best;
  }

  private attach(gate: number, first: (id: number) => ToWorker, events: (e: WorkerEvent) => void,
    w = this.workers.reduce((a, b) => (b.channels < a.channels ? b : a)), closed?: (e: WorkerEvent) => void): OpenChannel {
    if (this.closing) throw new Error('the I/O workers are stopping');
    const id = this.nextId++;
    w.channels++;
    w.port.ref();
    this.owner.set(id, w);
    this.handlers.set(id, events);
    if (closed) this.onClose.set(id, closed);
    // The worker lets go of it (gateDrop) when the channel is done with it.
    if (gate) this.heap.wasm.gateRetain(gate);
    const send = (m: ToWorker) => { w.port.postMessage(m); wake(w.wakeFd); };
    send(first(id));
    return { id, send };
  }

  private deliver(e: WorkerEvent): void {
    const h = this.handlers.get(e.id);
    if (!h) return;
    if (e.t === 'closed') {
      const w = this.owner.get(e.id)!;
      this.onClose.get(e.id)?.(e);
      this.onClose.delete(e.id);
      this.handlers.delete(e.id);
      this.owner.delete(e.id);
      if (--w.channels === 0) w.port.unref();
    }
    h(e);
  }

  /** Closes every connection at once and stops the workers. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      for (const w of this.workers) { w.port.postMessage({ t: 'stop' } satisfies ToWorker); wake(w.wakeFd); }
      await Promise.allSettled(this.workers.map((w) => w.done));
      await this.pool.destroy();
      process.off('exit', this.onExit);
      for (const w of this.workers) {
        w.port.close();
        loadNative().close(w.wakeFd);
        this.heap.free(w.segs);
      }
    })();
    return this.closing;
  }
}
