// FileTarget: a block target that maps the device 1:1 onto one file. Native
// queue threads serve it entirely (READ/WRITE/FLUSH/DISCARD/WRITE_ZEROES);
// `alwaysSlow` sends every request through JavaScript instead (tests of the
// slow path), where `serveSlow` answers them with plain fs calls.
import * as fs from 'fs';
import { ublkAddon } from './native';
import { fromNative } from './errors';
import type { SlowRequest } from './device';

export interface FileTargetOptions {
  /** Device size; default: the file's size (rounded down to 512). */
  size?: number;
  alwaysSlow?: boolean;
  /**
   * Tests of the frontend's segment handling: plan every request as pieces
   * cut at multiples of `bytes`, and plan every `zeroEvery`-th piece as a
   * zero segment (reads return zeros there, writes to it are dropped), like
   * a sparse overlay would. Requests needing more than 64 pieces go slow.
   */
  split?: { bytes: number; zeroEvery?: number };
}

export class FileTarget {
  /** What native frontends read (target_js.h). */
  readonly handle: unknown;
  readonly size: number;
  private constructor(readonly fd: number, size: number, readonly alwaysSlow: boolean, split?: FileTargetOptions['split']) {
    this.size = size;
    try {
      this.handle = ublkAddon().fileTarget(fd, size, alwaysSlow, split?.bytes ?? 0, split?.zeroEvery ?? 0).handle;
    } catch (e) {
      throw fromNative(e, 'fileTarget');
    }
  }

  /** Opens `path` read-write; the native side keeps its own dup of the fd. */
  static open(path: string, opts: FileTargetOptions = {}): FileTarget {
    const fd = fs.openSync(path, 'r+');
    try {
      const size = opts.size ?? Math.floor(fs.fstatSync(fd).size / 512) * 512;
      return new FileTarget(fd, size, !!opts.alwaysSlow, opts.split);
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

  /** Closes the JS fd and lets go of the native target: its dup closes once no device uses it. */
  close(): void {
    ublkAddon().releaseTarget(this.handle);
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
