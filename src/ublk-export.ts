// Serves a strata Device as /dev/ublkbN: the I/O workers' rings serve its
// queues (src/ublk/queue.ts), planning reads and writes with the engine's
// WASM planner; everything else comes here and goes to the device's methods.
import * as os from 'os';
import type { Device } from './device';
import { UblkDevice, type SlowHandler, type Transport } from './ublk';
import { StrataError } from './errors';

export interface UblkServeOptions {
  transport?: Transport | 'auto';
  queues?: number;
  depth?: number;
  /** UBLK_F_USER_RECOVERY: the device outlives this process (see UblkDevice). Default 'reissue': requests in flight at a crash are re-sent to the recovering server (device writes are idempotent). */
  recovery?: boolean | 'reissue' | 'fail-io';
  /** Owner id tagged on the kernel device (ownerId() of the engine's cache directory). */
  owner?: number;
}

/** The slow path: requests the I/O workers hand back, answered by the device. */
export function deviceSlowHandler(dev: Device): SlowHandler {
  return async (req) => {
    switch (req.op) {
      case 'read': return dev.read(req.offset, req.length);
      case 'write': return dev.write(req.offset, req.data!, { fua: req.fua });
      case 'flush': return dev.flush();
      case 'discard': return dev.trim(req.offset, req.length);
      case 'write-zeroes': return dev.writeZeroes(req.offset, req.length, { fua: req.fua });
      default: throw new StrataError('ENOTSUP', `ublk op ${req.opcode} is not supported`);
    }
  };
}

export async function serveUblk(dev: Device, opts: UblkServeOptions = {}): Promise<UblkDevice> {
  return UblkDevice.create({
    io: dev.ioTarget(), size: dev.size, queues: opts.queues ?? Math.min(4, os.cpus().length), depth: opts.depth,
    transport: opts.transport, recovery: opts.recovery ?? 'reissue', onSlow: deviceSlowHandler(dev), owner: opts.owner,
  });
}

/** Takes over a ublk device whose server died, for a device resumed in this process. */
export async function recoverUblk(id: number, dev: Device): Promise<UblkDevice> {
  return UblkDevice.recover(id, { io: dev.ioTarget(), size: dev.size, onSlow: deviceSlowHandler(dev) });
}
