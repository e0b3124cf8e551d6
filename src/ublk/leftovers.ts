// Kernel ublk devices that a dead strata process left behind. Every device
// strata creates carries an owner id (a hash of the owning engine's cache
// directory) in dev_info.ublksrv_flags, which the kernel keeps for the
// server. A later process on the same directory recovers the devices its
// manifests name and removes the other ones it owns; devices of other
// owners (another strata data directory, other software) are left alone.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { ublkAddon, type KernelDeviceInfo } from './native';
import { fromNative } from './errors';
import { kernelDevices } from './features';
import { isAlive } from '../pid';

/** The owner id of devices served for the engine whose cache is `dir` (FNV-1a of its real path). */
export function ownerId(dir: string): number {
  let real = path.resolve(dir);
  try { real = fs.realpathSync(dir); } catch { /* not created yet: the resolved path */ }
  let h = 0x811c9dc5;
  for (const b of Buffer.from(real)) h = Math.imul(h ^ b, 0x01000193) >>> 0;
  return h;
}

/** GET_DEV_INFO of kernel device `id`; null when it is gone (ENODEV). Throws ENOENT without ublk_drv. */
export function kernelDeviceInfo(id: number): KernelDeviceInfo | null {
  try {
    return ublkAddon().ublkDeviceInfo(id);
  } catch (e) {
    if ((e as { errno?: number }).errno === os.constants.errno.ENODEV) return null;
    throw fromNative(e, 'UBLK_U_CMD_GET_DEV_INFO');
  }
}

/** Stops and deletes a kernel device nobody serves; I/O it holds fails. */
export async function removeKernelDevice(id: number): Promise<void> {
  try { await ublkAddon().ublkRemove(id); } catch (e) { throw fromNative(e, 'UBLK_U_CMD_DEL_DEV'); }
}

export interface LeftDevice {
  id: number;
  path: string;
  info: KernelDeviceInfo;
  /** removed: ours, unserved, now gone; failed: ours, removal failed; kept: someone else's or still served. */
  outcome: 'removed' | 'failed' | 'kept';
  why: string;
  error?: Error;
}

/**
 * Removes every kernel device tagged with `owner` that no live process
 * serves, except those in `keep` (the ones this process recovered).
 */
export async function sweepLeftDevices(owner: number, keep: ReadonlySet<number>): Promise<LeftDevice[]> {
  const out: LeftDevice[] = [];
  for (const id of kernelDevices()) {
    if (keep.has(id)) continue;
    let info: KernelDeviceInfo | null;
    try { info = kernelDeviceInfo(id); } catch { continue; } // vanished or unreadable: not ours to judge
    if (!info) continue;
    const base = { id, path: `/dev/ublkb${id}`, info };
    if (info.owner === null) { out.push({ ...base, outcome: 'kept', why: 'not created by strata' }); continue; }
    if (info.owner !== owner) { out.push({ ...base, outcome: 'kept', why: 'created by strata for another data directory' }); continue; }
    // This process's own (one being created is still 'dead' until START_DEV).
    if (info.ownerPid === process.pid) { out.push({ ...base, outcome: 'kept', why: 'this process serves it' }); continue; }
    if (info.state === 'live' && isAlive(info.ownerPid)) {
      out.push({ ...base, outcome: 'kept', why: `served by live process ${info.ownerPid}` });
      continue;
    }
    try {
      await removeKernelDevice(id);
      out.push({ ...base, outcome: 'removed', why: `left ${info.state} by process ${info.ownerPid}${isAlive(info.ownerPid) ? '' : ', which is gone'}` });
    } catch (e) {
      out.push({ ...base, outcome: 'failed', why: `left ${info.state} by process ${info.ownerPid}`, error: e as Error });
    }
  }
  return out;
}
