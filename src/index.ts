// strata's public API: a thin facade over the engine.
export { Engine, type EngineOptions, type ImportOptions, type ImportResult } from './engine';
export { Device, type DeviceOptions, type DeviceManifest, type SnapshotOptions, type SnapshotResult } from './device';
export type { CacheLimits } from './cache-evictor';
export { Codec, parseCodec, type LayerHeader, type Extent, type Frame } from './format';
export { StrataError } from './errors';
export { FsObjectStore } from './store/fs';
export { openStore } from './store/open';
export type { S3ObjectStore, S3StoreOptions } from './store/s3';
export type { ObjectStore, ObjectInfo } from './store/types';
export type { Progress } from './layer-writer';
// Serving devices from an embedding process.
export { NbdServer, type NbdServerOptions } from './nbd/server';
export { ExportMap, type NbdExport, type ExportResolver } from './nbd/export';
export { deviceExport } from './nbd-export';
