// ublk failures as StrataErrors that keep the kernel's exact errno.
import * as os from 'os';
import { StrataError, type ErrnoCode } from '../errors';

const MAPPED: ErrnoCode[] = ['EINVAL', 'EIO', 'ENOSPC', 'EOVERFLOW', 'ENOTSUP', 'ENOENT', 'EEXIST', 'EBUSY', 'EPERM', 'ENOMEM', 'EFAULT'];

export class UblkError extends StrataError {
  /** The kernel's own name for the errno (ENODEV, EOPNOTSUPP, ...), even when `code` had to fall back. */
  readonly sysCode: string;
  /** The step that failed, e.g. "UBLK_U_CMD_ADD_DEV". */
  readonly op: string;
  constructor(errno: number, op: string, message: string, options?: { cause?: unknown }) {
    const name = Object.entries(os.constants.errno).find(([, v]) => v === errno)?.[0] ?? `errno ${errno}`;
    const code: ErrnoCode = name === 'EOPNOTSUPP' ? 'ENOTSUP' : MAPPED.includes(name as ErrnoCode) ? name as ErrnoCode : 'EIO';
    super(code, message, options);
    this.name = 'UblkError';
    this.sysCode = name;
    this.op = op;
    Object.defineProperty(this, 'errno', { value: errno, enumerable: true });
  }
}

/** Wraps an error thrown or rejected by the addon. */
export function fromNative(e: unknown, fallbackOp: string): Error {
  const n = e as { errno?: number; op?: string; message?: string };
  if (n && typeof n.errno === 'number') return new UblkError(n.errno, n.op ?? fallbackOp, n.message ?? fallbackOp, { cause: e });
  return e instanceof Error ? e : new Error(String(e));
}
