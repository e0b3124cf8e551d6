// How an I/O worker places the requests of a device that is one plain file
// mapped 1:1 (a ublk FileTarget): every READ is one read of the file, every
// WRITE one write to it. No engine, no gate. Requests past the file's end
// read as zeros (completeRead), as the engine's do.
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

  close(): void {}
}
