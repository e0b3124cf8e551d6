// FileTarget: a block target that maps the device 1:1 onto one file. The
// I/O workers serve its requests (src/io/file-io.ts); FUA writes, discards
// on a file system without the fallocate mode, and with `alwaysSlow` every
// request (tests of the slow path), come to `serveSlow`, which answers with
// plain fs calls.
import * as fs from 'fs';
import type { SlowRequest } from './device';

export interface FileTargetOptions {
  /** Device size; default: the file's size (rounded down to 512). */
  size?: number;
  alwaysSlow?: boolean;
}

export class FileTarget {
  private constructor(readonly path: string, readonly fd: number, readonly size: number, readonly alwaysSlow: boolean) {}

  /** Opens `path` read-write (for the slow path; each device opens its own descriptor for the workers). */
  static open(path: string, opts: FileTargetOptions = {}): FileTarget {
    const fd = fs.openSync(path, 'r+');
    try {
      const size = opts.size ?? Math.floor(fs.fstatSync(fd).size / 512) * 512;
      return new FileTarget(path, fd, size, !!opts.alwaysSlow);
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }

  /** Answers a slow-path request with fs calls on the same file. */
  async serveSlow(req: SlowRequest): Promise<Buffer | void> {
    const { offset, length } = req;
    switch (req.op) {
      case 'read': {
        const buf = Buffer.alloc(length);
        let done = 0;
        while (done < length) {
          const { bytesRead } = await read(this.fd, buf, done, length - done, offset + done);
          if (bytesRead === 0) break;  // past EOF: zeros
          done += bytesRead;
        }
        return buf;
      }
      case 'write':
        await writeAll(this.fd, req.data!, offset);
        if (req.fua) await new Promise<void>((res, rej) => fs.fdatasync(this.fd, (e) => (e ? rej(e) : res())));
        return;
      case 'flush':
        await new Promise<void>((res, rej) => fs.fdatasync(this.fd, (e) => (e ? rej(e) : res())));
        return;
      case 'discard':
      case 'write-zeroes':
        await writeAll(this.fd, Buffer.alloc(length), offset);
        return;
      default:
        throw Object.assign(new Error(`unsupported op ${req.opcode}`), { errno: 95 });
    }
  }

  closed = false;

  close(): void {
    if (this.closed) return;
    this.closed = true;
    fs.closeSync(this.fd);
  }
}

function read(fd: number, buf: Buffer, off: number, len: number, pos: number) {
  return new Promise<{ bytesRead: number }>((res, rej) =>
    fs.read(fd, buf, off, len, pos, (e, bytesRead) => (e ? rej(e) : res({ bytesRead }))));
}

async function writeAll(fd: number, buf: Buffer, pos: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    done += await new Promise<number>((res, rej) =>
      fs.write(fd, buf, done, buf.length - done, pos + done, (e, n) => (e ? rej(e) : res(n))));
  }
}
