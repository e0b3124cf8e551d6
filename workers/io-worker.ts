// piscina worker hosting one I/O loop (src/io/loop.ts) for the engine's
// shared memory: one io_uring ring, the WASM planner on this thread, and the
// NBD connections the main thread hands over after negotiating them. The
// task (serve) runs until the pool stops it.
import { workerData, type MessagePort } from 'worker_threads';
import { instantiate } from '../src/wasm';
import { loadNative } from '../src/native';
import { IoLoop } from '../src/io/loop';
import type { ToWorker } from '../src/io/pool';
import { BlockIo, NO_DEVICE, type RequestGate, type Planner } from '../src/io/block-io';
import { Transmission, type TransmissionEvent } from '../src/nbd/transmission';

export interface ServeTask { port: MessagePort; wakeFd: number; segs: number; segCap: number; blockSize: number; maxChunks: number; halt: Int32Array }

export function serve(task: ServeTask): { connections: number } {
  const memory: WebAssembly.Memory = workerData.memory;
  // The segments were allocated before this worker started, so a view of
  // the memory as it is now covers them for good (growth never moves them).
  const plan: Planner = { wasm: instantiate(memory), view: new DataView(memory.buffer), segs: task.segs, segCap: task.segCap, blockSize: task.blockSize };
  const conns = new Map<number, Transmission>();
  let served = 0;
  const post = (e: TransmissionEvent) => {
    if (e.t === 'closed') conns.delete(e.id);
    const transfer = e.t === 'requests' ? e.reqs.flatMap((r) => (r.payload ? [r.payload.buffer as ArrayBuffer] : [])) : [];
    task.port.postMessage(e, transfer);
  };
  const onMessage = (raw: unknown) => {
    const m = raw as ToWorker;
    if (m.t === 'stop') {
      loop.stop();
      for (const c of conns.values()) c.destroy();
      return;
    }
    if (m.t === 'open') {
      let target: RequestGate = NO_DEVICE;
      try { if (m.target) target = new (loadNative().DeviceTarget)(m.target); } catch (e) {
        loadNative().close(m.fd);
        post({ t: 'closed', id: m.id, reason: (e as Error).message });
        return;
      }
      try {
        conns.set(m.id, new Transmission(m.id, m.fd, loop, new BlockIo(loop, target, plan), m.opts, m.initial, new Float64Array(m.stats), post));
        served++;
      } catch (e) {
        target.close();
        loadNative().close(m.fd);
        post({ t: 'closed', id: m.id, reason: (e as Error).message });
      }
      return;
    }
    const c = conns.get(m.id);
    if (!c) return; // closed meanwhile: its replies have nowhere to go
    loop.guard(c, () => {
      if (m.t === 'reply') c.reply(m.bytes, m.done, m.doneBytes);
      else if (m.t === 'shutdown') c.shutdown();
      else c.destroy();
    });
  };
  const loop = new IoLoop(task.port, task.wakeFd, onMessage, task.maxChunks, task.halt);
  task.port.postMessage({ t: 'ready' }); // the pool's ready
  loop.run(() => conns.size === 0);
  return { connections: served };
}
