// Typed view of the ublk part of the addon (native/ublk.cc): the control
// plane and what the I/O workers' rings need. The UAPI itself (command
// encodings, struct layouts, feature bits) lives in native/ublk_uapi.h.
import { loadNative } from '../native';

/** Op codes as the kernel reports them in a request (UBLK_IO_OP_*). */
export const UBLK_OP = { READ: 0, WRITE: 1, FLUSH: 2, DISCARD: 3, WRITE_SAME: 4, WRITE_ZEROES: 5 } as const;

export interface NativeDeviceInfo {
  id: number;
  transport: 'zero-copy' | 'user-copy';
  queues: number;
  depth: number;
  maxIo: number;
  /** UBLK_F_* names the device was created with. */
  flags: string[];
  /** Time from opening /dev/ublk-control to START_DEV returning (the native part, then the whole after start). */
  createMs: number;
  /** Its parts, in ms (0 after recover()): ADD_DEV and SET_PARAMS (native), then the char device opened, every tag fetched, START_DEV. */
  createSteps: { addDev: number; setParams: number; openCdev: number; queuesReady: number; startDev: number };
}

export interface NativeDeviceOptions {
  size?: number;
  queues?: number;
  depth?: number;
  maxIo?: number;
  transport?: 'auto' | 'zero-copy' | 'user-copy';
  recovery?: boolean | 'reissue' | 'fail-io';
  partScan?: boolean;
  owner?: number;
}

/** Any kernel ublk device, as UBLK_U_CMD_GET_DEV_INFO reports it. */
export interface KernelDeviceInfo {
  id: number;
  state: 'dead' | 'live' | 'quiesced' | 'fail-io' | 'unknown';
  /** The serving process the kernel recorded (the dead one, after a crash). */
  ownerPid: number;
  flags: string[];
  /** The strata owner id it was tagged with; null: not created by strata. */
  owner: number | null;
}

export interface NativeUblkDevice {
  /** ADD_DEV and SET_PARAMS; the queues are then fetched elsewhere and startDev() starts it. */
  start(): Promise<NativeDeviceInfo>;
  /** START_USER_RECOVERY of a device whose server died; startDev() ends the recovery. */
  recover(id: number): Promise<NativeDeviceInfo>;
  /** START_DEV (or END_USER_RECOVERY), once every tag of every queue was fetched. */
  startDev(): Promise<void>;
  stop(opts?: { try?: boolean }): Promise<void>;
  delete(): Promise<void>;
  abandon(): Promise<void>;
  stats(): { state: string };
}

export interface UblkAddon {
  ublkFeatures(): { flags: number; names: string[] };
  UblkDevice: new (opts: NativeDeviceOptions) => NativeUblkDevice;
  ublkDeviceInfo(id: number): KernelDeviceInfo;
  ublkRemove(id: number): Promise<void>;
  /** A queue's request descriptors (mmap of /dev/ublkcN, read-only; ublkUapi.desc*). */
  ublkIoDescs(cdevFd: number, queue: number, depth: number): ArrayBuffer;
  ublkUapi: UblkUapi;
}

/** The UAPI a ring serving ublk queues needs (native/ublk_uapi.h). */
export interface UblkUapi {
  fetchReq: number; commitAndFetchReq: number; resOk: number;
  /** UBLK_IO_F_FUA in a descriptor's op_flags. */
  ioFlagFua: number;
  descSize: number; descOpFlags: number; descSectors: number; descStartSector: number;
  /** USER_COPY: the position on /dev/ublkcN of (queue, tag) is base + queue * queueStride + tag * tagStride. */
  userCopyBase: number; userCopyQueueStride: number; userCopyTagStride: number;
}

export function ublkAddon(): UblkAddon {
  return loadNative() as unknown as UblkAddon;
}
