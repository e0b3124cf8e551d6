// piscina worker hosting one I/O loop (src/io/loop.ts) for the engine's
// shared memory: one io_uring ring, the WASM planner on this thread, and its
// channels: the NBD connections the main thread hands over after
// negotiating them, and ublk queues. The task (serve) runs until the pool
// stops it.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { threadId, workerData, type MessagePort } from 'worker_threads';
import { instantiate } from '../src/wasm';
import { loadNative } from '../src/native';
import { IoLoop, FIXED_SLOTS } from '../src/io/loop';

// Ring operations kept for everything but fetched ublk tags (NBD connections, data moves).
const OTHER_OPS = 4096;
import type { ToWorker } from '../src/io/pool';
import { BlockIo, type Planner } from '../src/io/block-io';
import { Transmission } from '../src/nbd/transmission';
import { FileIo } from '../src/io/file-io';
import { UblkQueue, type ZeroCopyFiles } from '../src/ublk/queue';
import type { WorkerEvent } from '../src/io/pool';


export interface ServeTask { port: MessagePort; wakeFd: number; segs: number; segCap: number; blockSize: number; maxChunks: number; halt: Int32Array }

export function serve(task: ServeTask): { connections: number } {
  const memory: WebAssembly.Memory = workerData.memory;
  // The segments were allocated before this worker started, so a view of
  // the memory as it is now covers them for good (growth never moves them).
  const plan: Planner = { wasm: instantiate(memory), view: new DataView(memory.buffer), segs: task.segs, segCap: task.segCap, blockSize: task.blockSize };
  const conns = new Map<number, Transmission | UblkQueue>();
  let served = 0;
  let zc: ZeroCopyFiles | null = null;
  let sparse = 0; // the sparse table's registration: 0, or -errno (then no zero copy here)
  const post = (e: WorkerEvent) => {
    if (e.t === 'closed') conns.delete(e.id);
    const transfer = e.t === 'requests' ? e.reqs.flatMap((r) => (r.payload ? [r.payload.buffer as ArrayBuffer] : []))
      : e.t === 'ublk-requests' ? e.reqs.flatMap((r) => (r.data ? [r.data.buffer as ArrayBuffer] : [])) : [];
    task.port.postMessage(e, transfer);
  };
  const refuse = (id: number, e: unknown) => post({ t: 'closed', id, reason: (e as Error).message });
  const onMessage = (raw: unknown) => {
    const m = raw as ToWorker;
    if (m.t === 'stop') {
      loop.stop();
      for (const c of conns.values()) (c instanceof UblkQueue ? c.drop() : c.destroy());
      return;
    }
    // The pool took a hold of the device's gate for this channel: its BlockIo lets go at close.
    if (m.t === 'open') {
      const io = new BlockIo(loop, m.gate, plan);
      try {
        conns.set(m.id, new Transmission(m.id, m.fd, loop, io, m.opts, m.initial, new Float64Array(m.stats), post));
        served++;
      } catch (e) {
        io.close();
        loadNative().close(m.fd);
        refuse(m.id, e);
      }
      return;
    }
    if (m.t === 'ublk-open') {
      // A FileTarget's queue has no device (and no gate: m.gate is 0).
      const io = m.spec.file >= 0 ? new FileIo(loop, m.spec.file) : new BlockIo(loop, m.gate, plan);
      try {
        if (m.spec.zeroCopy && !zc) throw new Error(`zero copy: this ring refused a sparse buffer table (errno ${-sparse})`);
        conns.set(m.id, new UblkQueue(m.id, loop, io, m.spec, zc, new Float64Array(m.stats), post));
        served++;
      } catch (e) {
        io.close();
        refuse(m.id, e);
      }
      return;
    }
    const c = conns.get(m.id);
    if (!c) return; // closed meanwhile: its replies have nowhere to go
    loop.guard(c, () => {
      if (c instanceof UblkQueue) {
        if (m.t === 'ublk-answer') c.answer(m.tag, m.result, m.data);
        else if (m.t === 'ublk-drop') c.drop();
      } else if (m.t === 'reply') c.reply(m.bytes, m.done, m.doneBytes);
      else if (m.t === 'shutdown') c.shutdown();
      else if (m.t === 'destroy') c.destroy();
    });
  };
  // This thread serves ublk queues: its memory reclaim must not wait on
  // writeback through them (the old native queue threads did the same).
  const flusher = loadNative().ioFlusher();
  const loop = new IoLoop(task.port, task.wakeFd, onMessage, task.maxChunks, task.halt);
  sparse = loop.sparseBuffers(FIXED_SLOTS);
  if (sparse === 0) zc = zeroCopyFiles();
  task.port.postMessage({ t: 'ready', ioFlusher: flusher, fixedSlots: sparse === 0 ? FIXED_SLOTS : 0, tagSlots: loop.capacity - OTHER_OPS }); // the pool's ready
  loop.run(() => conns.size === 0);
  const files = zc as ZeroCopyFiles | null;
  if (files) { fs.closeSync(files.zero); fs.closeSync(files.stage); }
  return { connections: served };
}

/**
 * /dev/zero, and the staging file zero-copy data for or from the main
 * thread passes through (only the ring reaches a request's pages): in
 * memory (/dev/shm) where there is one, unlinked at once.
 */
function zeroCopyFiles(): ZeroCopyFiles {
  const dir = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
  const file = path.join(dir, `strata-stage-${process.pid}-${threadId}`);
  const stage = fs.openSync(file, 'w+', 0o600);
  fs.unlinkSync(file);
  return { zero: fs.openSync('/dev/zero', 'r'), stage };
}
