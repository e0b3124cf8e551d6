// Typed errors carrying a POSIX errno, so frontends (NBD, ublk) can map an
// engine failure to the right wire or kernel error without string matching.
import * as os from 'os';

export type ErrnoCode = 'EINVAL' | 'EIO' | 'ENOSPC' | 'EOVERFLOW' | 'ENOTSUP' | 'ENOENT' | 'EEXIST' |
  'EBADMSG' | 'EROFS' | 'EBUSY' | 'ESHUTDOWN' | 'EPERM' | 'ENOMEM' | 'E2BIG' | 'EFAULT' | 'ETIMEDOUT';

export class StrataError extends Error {
  readonly errno: number;
  constructor(readonly code: ErrnoCode, message: string, options?: { cause?: unknown }) {
    super(`${code}: ${message}`, options);
    this.name = 'StrataError';
    this.errno = (os.constants.errno as Record<string, number>)[code] ?? 5;
  }
}

export const einval = (m: string) => new StrataError('EINVAL', m);
/** Corrupt or unreadable stored data (bad magic, checksum, truncation). */
export const ebadmsg = (m: string) => new StrataError('EBADMSG', m);
export const eio = (m: string, cause?: unknown) => new StrataError('EIO', m, { cause });

/** Turns a negative io_uring result into a StrataError. */
export function fromNegErrno(res: number, what: string): StrataError {
  const name = Object.entries(os.constants.errno).find(([, v]) => v === -res)?.[0] ?? `errno ${-res}`;
  const code = (['EINVAL', 'ENOSPC', 'EIO', 'ENOENT', 'EFAULT', 'ENOMEM'] as string[]).includes(name) ? name as ErrnoCode : 'EIO';
  return new StrataError(code, `${what}: ${name}`);
}
