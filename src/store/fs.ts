// Local filesystem object store: the embedded default. put() writes a temp
// file, fsyncs it, renames it into place and fsyncs the directory, so an
// object is either absent or complete, also across a crash.
import * as fs from 'fs';
import * as fsp from 'fs/promises';
import * as path from 'path';
import { randomBytes } from 'crypto';
import { StrataError, einval } from '../errors';
import type { ObjectInfo, ObjectStore } from './types';

const KEY_RE = /^[A-Za-z0-9._-]+(\/[A-Za-z0-9._-]+)*$/;

export function validateKey(key: string): void {
  if (typeof key !== 'string' || key.length === 0 || key.length > 512 || !KEY_RE.test(key) ||
    key.split('/').some((p) => p === '.' || p === '..' || p.startsWith('.tmp-'))) {
    throw einval(`invalid object key ${JSON.stringify(key)}`);
  }
}

export class FsObjectStore implements ObjectStore {
  constructor(readonly root: string) {
    fs.mkdirSync(root, { recursive: true });
  }

  private file(key: string): string {
    validateKey(key);
    return path.join(this.root, key);
  }

  async put(key: string, data: Uint8Array | AsyncIterable<Uint8Array>): Promise<void> {
    const dest = this.file(key);
    const dir = path.dirname(dest);
    await fsp.mkdir(dir, { recursive: true });
    const tmp = path.join(dir, `.tmp-${path.basename(dest)}-${randomBytes(6).toString('hex')}`);
    const fh = await fsp.open(tmp, 'wx', 0o644);
    try {
      if (data instanceof Uint8Array) await fh.write(data, 0, data.length, 0);
      else {
        let pos = 0;
        for await (const chunk of data) { await fh.write(chunk, 0, chunk.length, pos); pos += chunk.length; }
      }
      await fh.sync();
    } catch (e) {
      await fh.close().catch(() => {});
      await fsp.rm(tmp, { force: true });
      throw e;
    }
    await fh.close();
    await fsp.rename(tmp, dest);
    const dh = await fsp.open(dir, 'r');
    try { await dh.sync(); } finally { await dh.close(); }
  }

  async get(key: string, range?: { offset: number; length: number }): Promise<Buffer> {
    const file = this.file(key);
    let fh: fsp.FileHandle;
    try { fh = await fsp.open(file, 'r'); } catch (e) { throw notFound(key, e); }
    try {
      const size = (await fh.stat()).size;
      const offset = range?.offset ?? 0;
      const length = range?.length ?? size - offset;
      if (offset < 0 || length < 0 || offset + length > size) {
        throw new StrataError('EBADMSG', `object ${key} is ${size} bytes; range ${offset}+${length} is beyond it (truncated?)`);
      }
      const buf = Buffer.allocUnsafe(length);
      let got = 0;
      while (got < length) {
        const { bytesRead } = await fh.read(buf, got, length - got, offset + got);
        if (bytesRead === 0) throw new StrataError('EBADMSG', `object ${key} ended early`);
        got += bytesRead;
      }
      return buf;
    } finally { await fh.close(); }
  }

  async head(key: string): Promise<ObjectInfo | null> {
    try { return { key, size: (await fsp.stat(this.file(key))).size }; } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw e;
    }
  }

  async list(prefix: string): Promise<ObjectInfo[]> {
    const out: ObjectInfo[] = [];
    const walk = async (dir: string, rel: string) => {
      let ents: fs.Dirent[];
      try { ents = await fsp.readdir(dir, { withFileTypes: true }); } catch { return; }
      for (const e of ents) {
        if (e.name.startsWith('.tmp-')) continue;
        const k = rel ? `${rel}/${e.name}` : e.name;
        if (e.isDirectory()) await walk(path.join(dir, e.name), k);
        else if (k.startsWith(prefix)) {
          const st = await fsp.stat(path.join(dir, e.name)).catch(() => null); // deleted meanwhile
          if (st) out.push({ key: k, size: st.size, modified: st.mtimeMs });
        }
      }
    };
    await walk(this.root, '');
    return out.sort((a, b) => (a.key < b.key ? -1 : 1));
  }

  async delete(key: string): Promise<void> {
    await fsp.rm(this.file(key), { force: true });
  }

  /** Temporary files of puts that never finished (a crash mid-put), older than `olderThanMs` (GC). */
  sweepTemporary(olderThanMs: number, dryRun: boolean): Array<{ key: string; bytes: number; reason: string }> {
    const out: Array<{ key: string; bytes: number; reason: string }> = [];
    const walk = (dir: string, rel: string) => {
      let ents: fs.Dirent[];
      try { ents = fs.readdirSync(dir, { withFileTypes: true }); } catch { return; }
      for (const e of ents) {
        const p = path.join(dir, e.name), k = rel ? `${rel}/${e.name}` : e.name;
        if (e.isDirectory()) { walk(p, k); continue; }
        if (!e.name.startsWith('.tmp-')) continue;
        const st = fs.statSync(p, { throwIfNoEntry: false });
        if (!st || Date.now() - st.mtimeMs <= olderThanMs) continue;
        if (!dryRun) fs.rmSync(p, { force: true });
        out.push({ key: k, bytes: st.size, reason: 'temporary file of a put that never finished' });
      }
    };
    walk(this.root, '');
    return out;
  }
}

function notFound(key: string, e: unknown): Error {
  if ((e as NodeJS.ErrnoException).code === 'ENOENT') return new StrataError('ENOENT', `object ${key} not found`);
  return e as Error;
}
