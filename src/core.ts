// The shared machinery every engine part uses: one shared WASM memory (state
// tables, mappings, I/O arena), one io_uring ring over the arena, one piscina
// pool of WASM workers over the same memory, and the object store.
import * as path from 'path';
import * as fs from 'fs';
import { Piscina } from 'piscina';
import { SharedHeap } from './wasm';
import { ReadPlanner } from './device-view';
import { IoArena } from './arena';
import { Uring } from './uring';
import type { ObjectStore } from './store/types';
import { SharedFrameDir } from './shared-tier';
import { FetchQueue } from './fetch-queue';
import { PriorityTaskQueue } from './task-queue';
import { IoWorkers } from './io/pool';
import type { Task } from '../workers/codec-worker';

export interface CoreOptions {
  store: ObjectStore;
  /** Local directory for template frame caches and device overlays. */
  cacheDir: string;
  /** Codec/hash worker threads (default: number of CPUs). */
  workers?: number;
  /** Bytes of registered I/O buffer memory (default 48 MiB for requests plus 2 MiB per concurrent fetch, at least 16 MiB). */
  arenaBytes?: number;
  ringEntries?: number;
  /** A directory shared by hosts as a second frame cache tier (see shared-tier.ts). */
  sharedCacheDir?: string;
  /** Frame fetches from the store at once (default 16; see bench/README.md, "Cold start"). */
  fetchConcurrency?: number;
  /** Frames fetched ahead of sequential misses (default 4; 0: no readahead). */
  readaheadFrames?: number;
  /** I/O worker threads serving NBD connections (default: STRATA_IO_WORKERS, else one per CPU). */
  ioWorkers?: number;
}

export class Core {
  readonly heap: SharedHeap;
  /** Buffers for requests (device reads and writes). */
  readonly arena: IoArena;
  /**
   * Buffers for frame fetches and snapshot packing. Separate from `arena`
   * because requests wait on fetches: sharing one pool could deadlock when
   * requests hold all of it.
   */
  readonly bulk: IoArena;
  readonly uring: Uring;
  readonly pool: Piscina;
  readonly store: ObjectStore;
  readonly cacheDir: string;
  /** The shared second cache tier, when configured. */
  readonly tier2: SharedFrameDir | null;
  /** Orders and bounds this host's frame fetches (demand, readahead, prefetch). */
  readonly fetches: FetchQueue;
  readonly readaheadFrames: number;
  /** Plans device reads in WASM (assembly/plan.ts). */
  readonly planner: ReadPlanner;
  /** Hooks for metrics (the daemon sets them; no-ops otherwise). */
  readonly observe = { fetch: (_seconds: number, _ok: boolean): void => {} };
  /** Called after a frame enters the cache (the engine's evictor checks its limits). */
  onCached: () => void = () => {};
  /** Awaited before a fetch fills the cache (the engine's evictor makes room first when over its limit). */
  beforeFetch: () => Promise<void> | undefined = () => undefined;
  private scratch: number;
  private scratchLen = 1 << 20;
  private ioPool: IoWorkers | null = null;
  private readonly ioThreads: number | undefined;

  constructor(opts: CoreOptions) {
    this.store = opts.store;
    this.ioThreads = opts.ioWorkers;
    this.cacheDir = opts.cacheDir;
    this.tier2 = opts.sharedCacheDir ? new SharedFrameDir(opts.sharedCacheDir) : null;
    fs.mkdirSync(path.join(this.cacheDir, 'layers'), { recursive: true });
    fs.mkdirSync(path.join(this.cacheDir, 'devices'), { recursive: true });
    // Requests get 48 MiB by default; fetches enough for every one the queue
    // lets run at once (a 2 MiB frame each).
    const fetchConcurrency = opts.fetchConcurrency ?? 16;
    const bulkWant = Math.max(16 << 20, fetchConcurrency * (2 << 20));
    const arenaBytes = opts.arenaBytes ?? (48 << 20) + bulkWant;
    this.fetches = new FetchQueue(fetchConcurrency);
    this.readaheadFrames = opts.readaheadFrames ?? 4;
    // Reserve the low 64 KiB, then the arena at a fixed place so its
    // registration stays valid when the heap above it grows.
    this.heap = new SharedHeap({ reserveBytes: 65536 + arenaBytes, initialBytes: 65536 + arenaBytes + (16 << 20) });
    const bulkBytes = Math.min(Math.max(8 << 20, Math.floor(arenaBytes / 4), bulkWant), Math.floor(arenaBytes / 2));
    this.arena = new IoArena(65536, arenaBytes - bulkBytes);
    this.bulk = new IoArena(65536 + arenaBytes - bulkBytes, bulkBytes);
    this.uring = new Uring(this.heap.memory, { offset: 65536, length: arenaBytes }, opts.ringEntries ?? 256);
    const threads = Math.max(1, opts.workers ?? require('os').availableParallelism?.() ?? 2);
    this.pool = new Piscina({
      filename: path.join(__dirname, '..', 'workers', 'boot.js'),
      workerData: { memory: this.heap.memory },
      minThreads: threads, maxThreads: threads, idleTimeout: 60_000,
      taskQueue: new PriorityTaskQueue(),
    });
    this.scratch = this.heap.alloc(this.scratchLen);
    this.planner = new ReadPlanner(this.heap);
  }

  /** The I/O workers (started on first use: an engine that serves no connection has none). */
  io(): IoWorkers {
    this.ioPool ??= new IoWorkers(this.heap, { threads: this.ioThreads });
    return this.ioPool;
  }

  run<T>(task: Task): Promise<T> { return this.pool.run(task) as Promise<T>; }

  /** xxh64 (seed 0) of bytes that live outside the shared memory. */
  checksum(b: Uint8Array): bigint {
    if (b.length > this.scratchLen) {
      this.heap.free(this.scratch);
      this.scratchLen = Math.ceil(b.length / 4096) * 4096;
      this.scratch = this.heap.alloc(this.scratchLen);
    }
    this.heap.u8.set(b, this.scratch);
    return BigInt.asUintN(64, this.heap.wasm.xxh64(this.scratch, b.length, 0n));
  }

  async close(): Promise<void> {
    await this.ioPool?.close();
    await this.pool.destroy();
    this.uring.close();
  }
}
