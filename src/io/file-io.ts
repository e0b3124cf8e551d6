// How an I/O worker places the requests of a device that is one plain file
// mapped 1:1 (a ublk FileTarget): every READ is one read of the file, every
// WRITE one write to it, FLUSH an fdatasync, DISCARD and WRITE_ZEROES one
// hole punched. No engine, no gate. Requests past the file's end
// read as zeros (completeRead), as the engine's do.
import { FLAG_PUNCH, OP } from '../native';
import type { Channel, IoLoop } from './loop';
import { completeRead, pushRead, type Placement } from './block-io';

export class FileIo implements Placement {
  readonly readRoom = 1;

  constructor(private readonly loop: IoLoop, private readonly fd: number) {}

  read(owner: Channel, tag: number, offset: number, length: number, slot: number, at: number, fixed = -1): number {
    pushRead(this.loop, owner, tag, this.fd, slot, at, length, offset, fixed);
    return 1;
  }

  completeRead(res: number, op: number, owner?: Channel, tag = 0, zeroFd = -1): number {
    return completeRead(this.loop, res, op, owner, tag, zeroFd);
  }

  readDone(): void {}

  write(_owner: Channel, offset: number, length: number, slot: number, at: number): number {
    return this.loop.pwrite(slot, at, length, this.fd, offset);
  }

  writeStart(): number { return this.fd; }

  writeEnd(): void {}

  flush(owner: Channel, tag: number): boolean {
    this.loop.push(owner, tag, OP.FDATASYNC, this.fd, -1, 0, 0, 0);
    return true;
  }

  // DISCARD and WRITE_ZEROES both punch a hole (the range reads as zeros):
  // FALLOC_FL_ZERO_RANGE would keep the space, but tmpfs and overlayfs
  // refuse it, which sent every WRITE_ZEROES there to the main thread.
  discard(owner: Channel, tag: number, offset: number, length: number): boolean {
    this.loop.pushFallocate(owner, tag, this.fd, FLAG_PUNCH, offset, length);
    return true;
  }

  close(): void {}
}
