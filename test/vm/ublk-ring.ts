// Runs INSIDE the kernel test VM: a ublk device whose queues are served by
// an I/O loop's ring (src/io/loop.ts) on a worker thread, not by native
// queue threads: the ring is the daemon of every tag of both queues (one
// ring, many queues, as the I/O workers are meant to serve ublk), through
// the addon's thin pieces only — the UBLK_CMD ring operation, the mapped
// request descriptors, a device added without queues and started once its
// tags were fetched, and per transport:
//   user copy  reads and writes of /dev/ublkcN at the tag's position; the
//              worker keeps the blocks in a SharedArrayBuffer
//   zero copy  AUTO_BUF_REG: the kernel puts each request's pages in a slot
//              of the ring's sparse buffer table, and READ_FIXED/WRITE_FIXED
//              move them straight between a backing file and the request
// This thread checks what the worker stored.
//
//   node -r tsx/cjs test/vm/ublk-ring.ts
import * as fs from 'fs';
import { Worker, MessageChannel, isMainThread, workerData, parentPort, type MessagePort } from 'worker_threads';
import { loadNative, OP } from '../../src/native';
import { IoLoop, type Channel } from '../../src/io/loop';
import * as slabs from '../../src/io/slabs';
import { ublkAddon, UBLK_OP, type UblkUapi } from '../../src/ublk/native';
import { begin, check, finish, scratchFile, sh, startFioVerify, threadCount, transports } from './ublk-helpers';

const SIZE = 64 << 20;
const QUEUES = 2, DEPTH = 16, MAX_IO = 128 << 10;
const EOPNOTSUPP = 95;

interface Job { id: number; port: MessagePort; wakeFd: number; mem: SharedArrayBuffer; zc: boolean; backing: string }

// ---------------------------------------------------------------- worker

/** One queue of the device on the worker's loop: fetch every tag, serve, commit, until the kernel aborts them. */
class RingQueue implements Channel {
  private readonly descs: DataView;
  private readonly slot: number[] = [];
  private readonly op = new Int32Array(DEPTH).fill(-1); // the data operation in flight per tag (UBLK_OP), -1: a command
  private readonly len = new Int32Array(DEPTH);
  private readonly at = new Float64Array(DEPTH);
  private live = DEPTH;
  private fetched = false;
  served = 0;

  /** backingFd: zero copy's blocks (-1: user copy, in mem). */
  constructor(private readonly loop: IoLoop, private readonly fd: number, private readonly q: number,
    private readonly u: UblkUapi, private readonly mem: Uint8Array, private readonly backingFd: number, private readonly onGone: () => void) {
    this.descs = new DataView(ublkAddon().ublkIoDescs(fd, q, DEPTH));
    for (let t = 0; t < DEPTH; t++) {
      const s = loop.slabs.alloc(MAX_IO);
      if (s < 0) throw new Error('no buffer memory');
      this.slot.push(s);
    }
  }

  pump(): void {
    if (this.fetched) return;
    this.fetched = true;
    for (let t = 0; t < DEPTH; t++) this.loop.pushUblk(this, t, this.fd, this.u.fetchReq, this.q, t, -1, this.autoBufReg(t));
  }

  /** Zero copy: the slot of the ring's table the kernel puts this tag's request pages in. */
  private autoBufReg(tag: number): number { return this.backingFd < 0 ? 0 : this.q * DEPTH + tag; }

  private pos(tag: number): number { return this.u.userCopyBase + this.q * this.u.userCopyQueueStride + tag * this.u.userCopyTagStride; }
  private commit(tag: number, result: number): void {
    this.served++;
    this.op[tag] = -1;
    this.loop.pushUblk(this, tag, this.fd, this.u.commitAndFetchReq, this.q, tag, result, this.autoBufReg(tag));
  }

  complete(tag: number, res: number): void {
    const s = this.slot[tag], buf = this.loop.slabs.buf(s), so = slabs.offsetOf(s);
    if (this.op[tag] === UBLK_OP.READ) { // the data went to the request
      this.commit(tag, res < 0 ? res : this.len[tag]);
      return;
    }
    if (this.op[tag] === UBLK_OP.WRITE) { // the data came from the request
      if (res >= 0 && this.backingFd < 0) this.mem.set(buf.subarray(so, so + this.len[tag]), this.at[tag]);
      this.commit(tag, res < 0 ? res : this.len[tag]);
      return;
    }
    // A FETCH or COMMIT_AND_FETCH completed: a new request, or the end.
    if (res !== this.u.resOk) {
      if (--this.live === 0) this.onGone();
      return;
    }
    const d = tag * this.u.descSize;
    const op = this.descs.getUint32(d + this.u.descOpFlags, true) & 0xff;
    const len = this.descs.getUint32(d + this.u.descSectors, true) * 512;
    const at = Number(this.descs.getBigUint64(d + this.u.descStartSector, true)) * 512;
    this.op[tag] = op; this.len[tag] = len; this.at[tag] = at;
    const zc = this.backingFd >= 0;
    if (zc && (op === UBLK_OP.READ || op === UBLK_OP.WRITE)) {
      this.loop.pushFixed(this, tag, op === UBLK_OP.READ ? OP.READ : OP.WRITE, this.backingFd, this.autoBufReg(tag), 0, len, at);
    } else if (op === UBLK_OP.READ) {
      buf.set(this.mem.subarray(at, at + len), so);
      this.loop.push(this, tag, OP.WRITE, this.fd, s, 0, len, this.pos(tag));
    } else if (op === UBLK_OP.WRITE) {
      this.loop.push(this, tag, OP.READ, this.fd, s, 0, len, this.pos(tag));
    } else if (op === UBLK_OP.FLUSH) {
      this.commit(tag, 0);
    } else if ((op === UBLK_OP.DISCARD || op === UBLK_OP.WRITE_ZEROES) && !zc) {
      this.mem.fill(0, at, at + len);
      this.commit(tag, 0);
    } else {
      this.commit(tag, -EOPNOTSUPP);
    }
  }

  fail(e: Error): void { console.log(`FAIL queue ${this.q}: ${e.stack ?? e}`); }
}

function serveQueues(job: Job): void {
  const u = ublkAddon().ublkUapi;
  const fd = fs.openSync(`/dev/ublkc${job.id}`, 'r+');
  const mem = new Uint8Array(job.mem);
  const queues: RingQueue[] = [];
  let gone = 0;
  const loop = new IoLoop(job.port, job.wakeFd, () => {}, 64);
  const backingFd = job.zc ? fs.openSync(job.backing, 'r+') : -1;
  if (job.zc) {
    const r = loop.sparseBuffers(QUEUES * DEPTH);
    if (r < 0) throw new Error(`sparse buffer table: errno ${-r}`);
  }
  // The FETCHes are submitted with the loop's first turn; a NOP behind them
  // completes in that same submission and says so to the main thread.
  const announce: Channel = {
    pump() {}, fail() {},
    complete() { parentPort!.postMessage({ t: 'fetched' }); },
  };
  for (let q = 0; q < QUEUES; q++) {
    queues.push(new RingQueue(loop, fd, q, u, mem, backingFd, () => {
      if (++gone === QUEUES) {
        parentPort!.postMessage({ t: 'done', served: queues.map((x) => x.served) });
        loop.stop();
      }
    }));
  }
  for (const q of queues) q.pump();
  loop.push(announce, 0, OP.NOP, -1, -1, 0, 0, 0);
  loop.run(() => gone === QUEUES);
  fs.closeSync(fd);
  if (backingFd >= 0) fs.closeSync(backingFd);
}

// ------------------------------------------------------------------ main

async function main(): Promise<void> {
  const { f, t0 } = begin('ublk-ring', DIR);
  for (const transport of transports(f)) await serve(transport);
  finish('ublk-ring', t0);
}

async function serve(transport: 'zero-copy' | 'user-copy'): Promise<void> {
  const native = loadNative();
  const addon = ublkAddon();
  const zc = transport === 'zero-copy';
  const backing = `${DIR}/backing-${transport}`;
  scratchFile(backing, SIZE);
  const unusedFd = fs.openSync(backing, 'r');
  const dev = new addon.UblkDevice(addon.fileTarget(unusedFd, SIZE), { size: SIZE, queues: QUEUES, depth: DEPTH, maxIo: MAX_IO, transport, external: true }, () => {});
  const threads0 = threadCount();
  const info = await dev.start();
  check(info.transport === transport, `${transport}: added (${info.flags.join(' ')})`);
  check(threadCount() === threads0, `${transport}: without queue threads (${threads0} threads before, ${threadCount()} after)`);
  const mem = new SharedArrayBuffer(SIZE);
  const stored = () => (zc ? fs.readFileSync(backing) : Buffer.from(mem));
  const { port1, port2 } = new MessageChannel();
  const wakeFd = native.eventfd();
  const worker = new Worker(__filename, { workerData: { id: info.id, port: port2, wakeFd, mem, zc, backing } satisfies Job, transferList: [port2] });
  const msgs: Array<{ t: string; served?: number[] }> = [];
  worker.on('message', (m) => msgs.push(m));
  worker.on('error', (e) => check(false, `${transport}: worker: ${e.stack ?? e}`));
  const next = async (t: string, ms: number) => {
    const end = Date.now() + ms;
    while (Date.now() < end) {
      const i = msgs.findIndex((m) => m.t === t);
      if (i >= 0) return msgs.splice(i, 1)[0];
      await new Promise((r) => setTimeout(r, 20));
    }
    return null;
  };
  check(!!(await next('fetched', 30_000)), `${transport}: the worker\'s ring fetched every tag of both queues`);
  await dev.startDev();
  const bdev = `/dev/ublkb${info.id}`;
  check(fs.existsSync(bdev), `${transport}: START_DEV: ${bdev} is up, served by the worker's ring`);

  // dd: 8 MiB of a pattern at 4 MiB, then read back, both bypassing the page cache.
  const pattern = Buffer.alloc(8 << 20);
  for (let i = 0; i < pattern.length; i += 4) pattern.writeUInt32LE((i * 2654435761) >>> 0, i);
  fs.writeFileSync(`${DIR}/pattern`, pattern);
  await sh(`dd if=${DIR}/pattern of=${bdev} bs=64k seek=64 oflag=direct status=none`);
  check(stored().subarray(4 << 20, 12 << 20).equals(pattern), `${transport}: dd's writes are what the worker stored`);
  await sh(`dd if=${bdev} of=${DIR}/back bs=128k skip=32 count=64 iflag=direct status=none`);
  check(fs.readFileSync(`${DIR}/back`).equals(pattern), `${transport}: and read back through the device`);

  const fio = startFioVerify(bdev, 32);
  const code = await fio.done;
  check(fio.clean(code), `${transport}: fio randwrite + verify (4 KiB, depth 16) on the worker's ring: exit ${code}${fio.clean(code) ? '' : `\n${fio.out()}`}`);

  await dev.stop();
  const done = await next('done', 30_000);
  check(!!done, `${transport}: STOP_DEV: the kernel aborted every fetched tag; the worker let the queues go`);
  check(!!done && done.served!.every((n) => n > 0), `${transport}: both queues served requests (${done?.served?.join(' + ')} commits)`);
  await dev.delete();
  await worker.terminate();
  native.close(wakeFd);
  fs.closeSync(unusedFd);
  check(!fs.existsSync(bdev), `${transport}: deleted`);
}

const DIR = '/tmp/strata-ublk-ring';
if (isMainThread) main().catch((e) => { check(false, String((e as Error).stack ?? e)); finish('ublk-ring', Date.now()); });
else serveQueues(workerData as Job);
