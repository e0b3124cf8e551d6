// The object-store contract every backend (local filesystem now, S3 later)
// implements. Objects are immutable once put; put is atomic (readers see the
// whole object or nothing).

export interface ObjectInfo {
  key: string; size: number;
  /** When the object was stored (ms since the epoch), where the backend says (listings do; GC's grace period needs it). */
  modified?: number;
}

export interface ObjectStore {
  /** Atomically store `data` (a buffer or a stream of chunks) under `key`. */
  put(key: string, data: Uint8Array | AsyncIterable<Uint8Array>): Promise<void>;
  /** Whole object, or `length` bytes at `offset`; short objects are an error. */
  get(key: string, range?: { offset: number; length: number }): Promise<Buffer>;
  head(key: string): Promise<ObjectInfo | null>;
  list(prefix: string): Promise<ObjectInfo[]>;
  delete(key: string): Promise<void>;
}
