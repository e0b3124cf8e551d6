// An optional second cache tier shared by several hosts: a directory (an NFS
// mount, say) of compressed frames, one file per frame at
//   <root>/<layer>/<compressed offset>.frm
// Frames are written through as a snapshot or import uploads them, and
// written back after a fetch from the object store only once their checksum
// verified (shared/seeds/003). A writer takes <name>.lock (O_EXCL), writes a
// private temp file, fsyncs it and renames it into place, so no host ever
// sees a partial frame; a host finding the lock taken leaves the frame to
// its owner. Readers verify every frame (the engine checks its checksum),
// and a frame that fails is deleted and fetched from the store instead.
import * as fs from 'fs';
import * as fsp from 'fs/promises';
import * as os from 'os';
import * as path from 'path';
import { randomBytes } from 'crypto';

const STALE_LOCK_MS = 60_000;

export interface SharedFrame { c: number; cSize: number }

export class SharedFrameDir {
  stats = { hits: 0, misses: 0, writes: 0, writeSkips: 0, writeErrors: 0, discarded: 0 };
  private active = 0;
  private queue: Array<() => void> = [];
  private pending = new Set<Promise<void>>();

  constructor(readonly root: string, private readonly maxWriters = 4) {
    fs.mkdirSync(root, { recursive: true });
  }

  private file(layer: string, f: SharedFrame): string { return path.join(this.root, layer, `${f.c}.frm`); }

  /** The frame's compressed bytes, or null when this tier lacks it (or holds a wrong-size file). */
  async get(layer: string, f: SharedFrame): Promise<Buffer | null> {
    let b: Buffer;
    try { b = await fsp.readFile(this.file(layer, f)); } catch { this.stats.misses++; return null; }
    if (b.length !== f.cSize) { this.stats.misses++; await this.discard(layer, f); return null; }
    this.stats.hits++;
    return b;
  }

  /** Removes a frame that failed verification. */
  async discard(layer: string, f: SharedFrame): Promise<void> {
    this.stats.discarded++;
    await fsp.rm(this.file(layer, f), { force: true });
  }

  /** Writes a frame in the background (bounded concurrency); failures only count. */
  put(layer: string, f: SharedFrame, bytes: Uint8Array): void {
    const p = this.run(() => this.write(layer, f, bytes)).catch(() => { this.stats.writeErrors++; })
      .finally(() => this.pending.delete(p));
    this.pending.add(p);
  }

  /** Resolves when every background write has finished. */
  async idle(): Promise<void> { while (this.pending.size) await Promise.allSettled([...this.pending]); }

  private async run(fn: () => Promise<void>): Promise<void> {
    if (this.active >= this.maxWriters) await new Promise<void>((r) => this.queue.push(r));
    this.active++;
    try { await fn(); } finally { this.active--; this.queue.shift()?.(); }
  }

  /** Lock, temp file, fsync, rename: the final name only ever holds a whole frame. */
  async write(layer: string, f: SharedFrame, bytes: Uint8Array): Promise<void> {
    const dest = this.file(layer, f);
    try { if ((await fsp.stat(dest)).size === f.cSize) return; } catch { /* absent */ }
    await fsp.mkdir(path.dirname(dest), { recursive: true });
    const lock = `${dest}.lock`;
    let lockFd: fsp.FileHandle;
    try { lockFd = await fsp.open(lock, 'wx'); } catch {
      // Someone else is writing it, unless their lock is stale.
      const st = await fsp.stat(lock).catch(() => null);
      if (st && Date.now() - st.mtimeMs < STALE_LOCK_MS) { this.stats.writeSkips++; return; }
      await fsp.rm(lock, { force: true });
      try { lockFd = await fsp.open(lock, 'wx'); } catch { this.stats.writeSkips++; return; }
    }
    const tmp = `${dest}.tmp-${os.hostname()}-${process.pid}-${randomBytes(4).toString('hex')}`;
    try {
      const fh = await fsp.open(tmp, 'wx', 0o644);
      try { await fh.write(bytes, 0, bytes.length, 0); await fh.sync(); } finally { await fh.close(); }
      await fsp.rename(tmp, dest);
      this.stats.writes++;
    } finally {
      await fsp.rm(tmp, { force: true });
      await lockFd.close();
      await fsp.rm(lock, { force: true });
    }
  }
}
