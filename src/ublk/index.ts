// The ublk frontend: features(), UblkDevice, FileTarget.
export { features, kernelDevices, type UblkFeatures } from './features';
export { UblkDevice, transportFromEnv, type UblkCreateOptions, type SlowRequest, type SlowHandler, type SlowOp, type Transport } from './device';
export { FileTarget, type FileTargetOptions } from './file-target';
export { UblkError } from './errors';
export { ownerId, kernelDeviceInfo, removeKernelDevice, sweepLeftDevices, type LeftDevice } from './leftovers';
export type { KernelDeviceInfo } from './native';
