// What the running kernel's ublk driver offers (UBLK_U_CMD_GET_FEATURES).
import * as fs from 'fs';
import { ublkAddon } from './native';
import { fromNative } from './errors';

export interface UblkFeatures {
  /** Raw UBLK_F_* bits. */
  flags: number;
  /** Their names, e.g. ['USER_COPY', 'AUTO_BUF_REG', ...]. */
  names: string[];
  zeroCopy: boolean;
  userCopy: boolean;
  recovery: boolean;
  /** The transport `auto` picks. */
  transport: 'zero-copy' | 'user-copy' | null;
}

/** Throws a UblkError (ENOENT when ublk_drv is not loaded, EINVAL before 6.5). */
export function features(): UblkFeatures {
  let raw: { flags: number; names: string[] };
  try {
    raw = ublkAddon().ublkFeatures();
  } catch (e) {
    throw fromNative(e, 'UBLK_U_CMD_GET_FEATURES');
  }
  const has = (n: string) => raw.names.includes(n);
  const zeroCopy = has('SUPPORT_ZERO_COPY') && has('AUTO_BUF_REG');
  const userCopy = has('USER_COPY');
  return {
    ...raw, zeroCopy, userCopy, recovery: has('USER_RECOVERY'),
    transport: zeroCopy ? 'zero-copy' : userCopy ? 'user-copy' : null,
  };
}

// The kernel's ublk character devices (class "ublk-char": ublkc0, ublkc1, ...).
const UBLK_CLASS = '/sys/class/ublk-char';

/** Ids of the ublk devices the kernel has now (whoever serves them). */
export function kernelDevices(): number[] {
  let names: string[];
  try { names = fs.readdirSync(UBLK_CLASS); } catch { return []; }
  return names.map((n) => /^ublkc(\d+)$/.exec(n)).filter((m): m is RegExpExecArray => !!m).map((m) => Number(m[1]));
}
