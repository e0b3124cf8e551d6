// Runs INSIDE the kernel test VM: a ublk device whose queues an I/O loop's
// ring on a worker thread serves (test/vm/ring-server.ts), with no native
// queue thread, per transport the kernel offers: dd and fio crc32c verify
// through the device land in the backing file and read back; STOP_DEV
// aborts every tag the ring fetched.
//
//   node -r tsx/cjs test/vm/ublk-ring.ts
import * as fs from 'fs';
import { startRingServer } from './ring-server';
import { begin, check, finish, scratchFile, sh, startFioVerify, threadCount, transports } from './ublk-helpers';

const DIR = '/tmp/strata-ublk-ring';
const SIZE = 64 << 20;

async function serve(transport: 'zero-copy' | 'user-copy'): Promise<void> {
  const backing = `${DIR}/backing-${transport}`;
  scratchFile(backing, SIZE);
  const threads0 = threadCount();
  const srv = await startRingServer(backing, { size: SIZE, queues: 2, depth: 16, maxIo: 128 << 10, transport });
  check(srv.info.transport === transport, `${transport}: added (${srv.info.flags.join(' ')}) and started once a worker's ring fetched every tag of both queues`);
  // The worker thread is the one new thread: no queue threads.
  check(threadCount() === threads0 + 1, `${transport}: ${threads0} threads before, ${threadCount()} after (the worker; no queue threads)`);

  const pattern = Buffer.alloc(8 << 20);
  for (let i = 0; i < pattern.length; i += 4) pattern.writeUInt32LE((i * 2654435761) >>> 0, i);
  fs.writeFileSync(`${DIR}/pattern`, pattern);
  await sh(`dd if=${DIR}/pattern of=${srv.path} bs=64k seek=64 oflag=direct status=none`);
  check(fs.readFileSync(backing).subarray(4 << 20, 12 << 20).equals(pattern), `${transport}: dd's writes (8 MiB at 4 MiB) are in the backing file`);
  await sh(`dd if=${srv.path} of=${DIR}/back bs=128k skip=32 count=64 iflag=direct status=none`);
  check(fs.readFileSync(`${DIR}/back`).equals(pattern), `${transport}: and read back through the device`);

  const fio = startFioVerify(srv.path, 32);
  const code = await fio.done;
  check(fio.clean(code), `${transport}: fio randwrite + verify (4 KiB, depth 16): exit ${code}${fio.clean(code) ? '' : `\n${fio.out()}`}`);

  const served = await srv.stop();
  check(served.length === 2 && served.every((n) => n > 0), `${transport}: STOP_DEV aborted every fetched tag; both queues had served requests (${served.join(' + ')} commits)`);
  await srv.delete();
  check(!fs.existsSync(srv.path), `${transport}: deleted`);
}

async function main(): Promise<void> {
  const { f, t0 } = begin('ublk-ring', DIR);
  for (const transport of transports(f)) await serve(transport);
  finish('ublk-ring', t0);
}

main().catch((e) => { check(false, String((e as Error).stack ?? e)); finish('ublk-ring', Date.now()); });
