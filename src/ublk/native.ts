// Typed view of the ublk part of the addon (native/ublk.cc). The UAPI itself
// (command encodings, struct layouts, feature bits) lives in native/ublk_uapi.h.
import { loadNative } from '../native';

/** Op codes as the kernel reports them in a request (UBLK_IO_OP_*). */
export const UBLK_OP = { READ: 0, WRITE: 1, FLUSH: 2, DISCARD: 3, WRITE_SAME: 4, WRITE_ZEROES: 5 } as const;

export interface NativeSlowRequest {
  queue: number;
  tag: number;
  op: number;
  flags: number;
  fua: boolean;
  offset: number;
  length: number;
  /** WRITE only: a copy of the request's data. */
  data?: Buffer;
}

export interface NativeDeviceInfo {
  id: number;
  transport: 'zero-copy' | 'user-copy';
  queues: number;
  depth: number;
  maxIo: number;
  /** UBLK_F_* names the device was created with. */
  flags: string[];
  /** Native time from opening /dev/ublk-control to START_DEV returning. */
  createMs: number;
  /** Its parts, in ms (0 after recover()). */
  createSteps: { addDev: number; setParams: number; openCdev: number; queuesReady: number; startDev: number };
}

export interface NativeDeviceOptions {
  size?: number;
  queues?: number;
  depth?: number;
  maxIo?: number;
  transport?: 'auto' | 'zero-copy' | 'user-copy';
  recovery?: boolean | 'reissue' | 'fail-io';
  alwaysSlow?: boolean;
  partScan?: boolean;
  owner?: number;
  /** Its queues are served by another ring (an I/O worker's): start() only adds it; startDev() starts it. */
  external?: boolean;
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
  start(): Promise<NativeDeviceInfo>;
  recover(id: number): Promise<NativeDeviceInfo>;
  /** external devices: START_DEV, once every tag of every queue was fetched. */
  startDev(): Promise<void>;
  drain(): NativeSlowRequest[];
  /** result: bytes for READ/WRITE, 0 for others, or -errno. false once the device is gone. */
  complete(queue: number, tag: number, result: number, data?: Uint8Array): boolean;
  stop(opts?: { try?: boolean }): Promise<void>;
  delete(): Promise<void>;
  abandon(): Promise<void>;
  stats(): { fastIos: number; slowIos: number; waits: number; cqes: number; state: string };
}

export interface TargetObject {
  handle: unknown;
}

export interface UblkAddon {
  ublkFeatures(): { flags: number; names: string[] };
  UblkDevice: new (target: TargetObject, opts: NativeDeviceOptions, onSlow: () => void) => NativeUblkDevice;
  ublkDeviceInfo(id: number): KernelDeviceInfo;
  ublkRemove(id: number): Promise<void>;
  fileTarget(fd: number, size: number, alwaysSlow?: boolean, split?: number, zeroEvery?: number): TargetObject;
  /** Drops a target handle's share of its native target (target_js.h). */
  releaseTarget(handle: unknown): void;
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
