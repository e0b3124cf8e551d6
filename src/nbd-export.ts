// Adapts a strata Device to the NBD server's export interface.
import type { Device } from './device';
import type { NbdExport } from './nbd/export';
import { StrataError } from './errors';

export function deviceExport(dev: Device, description?: string): NbdExport {
  return {
    get size() { return dev.size; },
    description: description ?? `strata device ${dev.id} on layer ${dev.layerId}`,
    read: (o, l) => dev.read(o, l),
    readView: (o, l) => dev.readView(o, l),
    write: (o, d, fua) => dev.write(o, d, { fua }),
    flush: () => dev.flush(),
    trim: (o, l) => dev.trim(o, l),
    writeZeroes: async (o, l, { fua, noHole, fast }) => {
      // Whole blocks zero by a state change: fast. Partial blocks need a
      // read-modify-write that may fetch from the store: not fast.
      if (fast && (o % 4096 || l % 4096)) throw new StrataError('ENOTSUP', 'fast zero of a partial block');
      await dev.writeZeroes(o, l, { fua, noHole });
    },
    cache: (o, l) => dev.prefetch(o, l),
    zeroMap: (o, l) => dev.zeroMap(o, l),
    io: () => dev.ioTarget(),
  };
}
