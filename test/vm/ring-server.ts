// A bare ublk server whose queues an I/O loop's ring serves (src/io/loop.ts)
// on a worker thread instead of native queue threads: one ring is the
// daemon of every tag of every queue, through the addon's thin pieces only
// (the ring's UBLK_CMD operation, the mapped request descriptors, a device
// added without queues and started once its tags were fetched). The blocks
// live in a backing file:
//   user copy  file -> buffer -> /dev/ublkcN at the tag's position, and back
//   zero copy  AUTO_BUF_REG puts each request's pages in a slot of the
//              ring's sparse buffer table; READ_FIXED/WRITE_FIXED move them
//              straight between the file and the request
// Used by test/vm/ublk-ring.ts and the ring-* peers of bench/ublk.ts: the
// step before the I/O workers serve strata's own ublk devices.
import * as fs from 'fs';
import { Worker, MessageChannel, workerData, parentPort, type MessagePort } from 'worker_threads';
import { loadNative, OP } from '../../src/native';
import { IoLoop, type Channel } from '../../src/io/loop';
import { ublkAddon, UBLK_OP, type UblkUapi, type NativeUblkDevice, type NativeDeviceInfo } from '../../src/ublk/native';

const EOPNOTSUPP = 95;

// cdev: /dev/ublkcN, opened once by the main thread (the kernel allows one opener) and shared by the workers.
interface Job { cdev: number; port: MessagePort; wakeFd: number; zc: boolean; backing: string; queueIds: number[]; depth: number; maxIo: number }

/** One queue on the worker's loop: fetch every tag, serve, commit, until the kernel aborts them. */
class RingQueue implements Channel {
  private readonly descs: DataView;
  private readonly slot: number[] = [];
  // Per tag: the request's UBLK_OP while its data moves (-1: a command is out), length, offset, step.
  private readonly op: Int32Array;
  private readonly len: Int32Array;
  private readonly at: Float64Array;
  private readonly step: Int32Array;
  private live: number;
  served = 0;

  constructor(private readonly loop: IoLoop, private readonly fd: number, private readonly q: number, private readonly depth: number,
    private readonly u: UblkUapi, private readonly backing: number, private readonly zc: boolean, private readonly onGone: () => void) {
    this.descs = new DataView(ublkAddon().ublkIoDescs(fd, q, depth));
    this.op = new Int32Array(depth).fill(-1);
    this.len = new Int32Array(depth);
    this.at = new Float64Array(depth);
    this.step = new Int32Array(depth);
    this.live = depth;
  }

  /** Queues a FETCH for every tag. */
  start(maxIo: number): void {
    for (let t = 0; t < this.depth; t++) {
      if (!this.zc) {
        const s = this.loop.slabs.alloc(maxIo);
        if (s < 0) throw new Error('ring server: no buffer memory');
        this.slot.push(s);
      }
      this.loop.pushUblk(this, t, this.fd, this.u.fetchReq, this.q, t, -1, this.bufReg(t));
    }
  }

  pump(): void {}
  fail(e: Error): void { console.log(`FAIL ring server queue ${this.q}: ${e.stack ?? e}`); }

  /** Zero copy: the slot of the ring's table the kernel puts this tag's request pages in. */
  private bufReg(tag: number): number { return this.zc ? this.q * this.depth + tag : 0; }
  private pos(tag: number): number { return this.u.userCopyBase + this.q * this.u.userCopyQueueStride + tag * this.u.userCopyTagStride; }

  private commit(tag: number, result: number): void {
    this.served++;
    this.op[tag] = -1;
    this.loop.pushUblk(this, tag, this.fd, this.u.commitAndFetchReq, this.q, tag, result, this.bufReg(tag));
  }

  complete(tag: number, res: number): void {
    const op = this.op[tag];
    if (op === -1) return this.request(tag, res);
    const len = this.len[tag];
    if (res < 0) return this.commit(tag, res);
    // User copy moves data in two steps: file -> buffer -> request (READ), request -> buffer -> file (WRITE).
    if (!this.zc && this.step[tag]++ === 0) {
      const s = this.slot[tag];
      if (op === UBLK_OP.READ) this.loop.push(this, tag, OP.WRITE, this.fd, s, 0, len, this.pos(tag));
      else this.loop.push(this, tag, OP.WRITE, this.backing, s, 0, len, this.at[tag]);
      return;
    }
    this.commit(tag, len);
  }

  /** A FETCH or COMMIT_AND_FETCH completed: a new request in the tag's descriptor, or the end. */
  private request(tag: number, res: number): void {
    if (res !== this.u.resOk) {
      if (--this.live === 0) this.onGone();
      return;
    }
    const d = tag * this.u.descSize;
    const op = this.descs.getUint32(d + this.u.descOpFlags, true) & 0xff;
    const len = this.descs.getUint32(d + this.u.descSectors, true) * 512;
    const at = Number(this.descs.getBigUint64(d + this.u.descStartSector, true)) * 512;
    if (op !== UBLK_OP.READ && op !== UBLK_OP.WRITE) {
      this.commit(tag, op === UBLK_OP.FLUSH ? 0 : -EOPNOTSUPP);
      return;
    }
    this.op[tag] = op; this.len[tag] = len; this.at[tag] = at; this.step[tag] = 0;
    const read = op === UBLK_OP.READ;
    if (this.zc) this.loop.pushFixed(this, tag, read ? OP.READ : OP.WRITE, this.backing, this.bufReg(tag), 0, len, at);
    else if (read) this.loop.push(this, tag, OP.READ, this.backing, this.slot[tag], 0, len, at);
    else this.loop.push(this, tag, OP.READ, this.fd, this.slot[tag], 0, len, this.pos(tag));
  }
}

/** The worker thread's side: serve every queue of the device until the kernel aborts them all. */
function serveQueues(job: Job): void {
  const u = ublkAddon().ublkUapi;
  const fd = job.cdev;
  const backing = fs.openSync(job.backing, 'r+');
  const loop = new IoLoop(job.port, job.wakeFd, () => {}, 64);
  const nq = Math.max(...job.queueIds) + 1;
  if (job.zc) {
    const r = loop.sparseBuffers(nq * job.depth);
    if (r < 0) throw new Error(`ring server: sparse buffer table: errno ${-r}`);
  }
  const queues: RingQueue[] = [];
  let gone = 0;
  for (const q of job.queueIds) {
    queues.push(new RingQueue(loop, fd, q, job.depth, u, backing, job.zc, () => {
      if (++gone === job.queueIds.length) {
        parentPort!.postMessage({ t: 'done', served: queues.map((x) => x.served) });
        loop.stop();
      }
    }));
  }
  for (const q of queues) q.start(job.maxIo);
  // The FETCHes go out with the loop's first submission; a NOP behind them
  // completes in it and tells the main thread.
  loop.push({ pump() {}, fail() {}, complete() { parentPort!.postMessage({ t: 'fetched' }); } }, 0, OP.NOP, -1, -1, 0, 0, 0);
  loop.run(() => gone === job.queueIds.length);
  fs.closeSync(backing);
}

export interface RingServer {
  readonly dev: NativeUblkDevice;
  readonly info: NativeDeviceInfo;
  readonly path: string;
  /** STOP_DEV, then waits for the worker to let every queue go; the commits per queue. */
  stop(): Promise<number[]>;
  /** stop() if needed, DEL_DEV, end the worker. */
  delete(): Promise<void>;
}

/**
 * Adds a device with no queue threads, has workers' rings fetch every tag
 * (`workers` threads, default 1, the queues dealt among them), starts it.
 */
export async function startRingServer(backing: string, opts: { size: number; queues: number; depth: number; maxIo: number; transport: 'zero-copy' | 'user-copy'; workers?: number }): Promise<RingServer> {
  const addon = ublkAddon(), native = loadNative();
  const unused = fs.openSync(backing, 'r'); // the native device wants a target; with external queues it never plans
  const dev = new addon.UblkDevice(addon.fileTarget(unused, opts.size), { ...opts, external: true }, () => {});
  const info = await dev.start();
  const n = Math.max(1, Math.min(opts.workers ?? 1, info.queues));
  const cdev = fs.openSync(`/dev/ublkc${info.id}`, 'r+');
  const msgs: Array<{ t: string; served?: number[] }> = [];
  let error: Error | null = null;
  const workers: Array<{ worker: Worker; wakeFd: number; port: MessagePort }> = [];
  for (let w = 0; w < n; w++) {
    const { port1, port2 } = new MessageChannel();
    const wakeFd = native.eventfd();
    const queueIds = Array.from({ length: info.queues }, (_, q) => q).filter((q) => q % n === w);
    const job: Job = { cdev, port: port2, wakeFd, zc: info.transport === 'zero-copy', backing, queueIds, depth: info.depth, maxIo: info.maxIo };
    const worker = new Worker(__filename, { workerData: job, transferList: [port2] });
    worker.on('message', (m) => msgs.push(m));
    worker.on('error', (e) => { error = e; });
    workers.push({ worker, wakeFd, port: port1 });
  }
  const next = async (t: string, ms: number) => {
    const end = Date.now() + ms;
    while (Date.now() < end && !error) {
      const i = msgs.findIndex((m) => m.t === t);
      if (i >= 0) return msgs.splice(i, 1)[0];
      await new Promise((r) => setTimeout(r, 10));
    }
    throw error ?? new Error(`ring server: no '${t}' from the worker in ${ms} ms`);
  };
  for (let w = 0; w < n; w++) await next('fetched', 30_000);
  await dev.startDev();
  let served: number[] | null = null;
  const stop = async () => {
    if (!served) {
      await dev.stop();
      const all: number[] = [];
      for (let w = 0; w < n; w++) all.push(...(await next('done', 30_000)).served!);
      served = all;
    }
    return served;
  };
  return {
    dev, info, path: `/dev/ublkb${info.id}`, stop,
    async delete() {
      await stop();
      await dev.delete();
      for (const w of workers) { await w.worker.terminate(); native.close(w.wakeFd); w.port.close(); }
      fs.closeSync(cdev);
      fs.closeSync(unused);
    },
  };
}

if (parentPort && workerData?.backing) serveQueues(workerData as Job);
