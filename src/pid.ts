// Whether a process id names a live process, and lock-file owners that a pid
// alone cannot name: after a host reboot (or enough process churn) a recorded
// pid can belong to an unrelated process, so an owner is the pid with this
// boot's id and the process's start time.
import * as fs from 'fs';

/** Whether `pid` names a live process (EPERM: alive, someone else's). */
export function isAlive(pid: number): boolean {
  if (!(pid > 0)) return false;
  try { process.kill(pid, 0); return true; } catch (e) { return (e as NodeJS.ErrnoException).code === 'EPERM'; }
}

/** This boot's id (Linux), '-' where the system has none. */
export function bootId(): string {
  try { return fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim() || '-'; } catch { return '-'; }
}

/** A process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or '-'. */
export function startTime(pid: number): string {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] ?? '-'; // fields after "(comm)" start at 3
  } catch { return '-'; }
}

/** What a lock file records of its owner, this process: "pid boot-id start-time". */
export function ownerToken(): string {
  return `${process.pid} ${bootId()} ${startTime(process.pid)}`;
}

/**
 * The pid a lock file's owner token names when that process still runs:
 * same boot and same start time (a bare pid, the older form, by liveness
 * only); null when the owner is gone.
 */
export function liveOwner(token: string): number | null {
  const [p, boot, start] = token.trim().split(/\s+/);
  const pid = Number(p);
  if (!Number.isInteger(pid) || !isAlive(pid)) return null;
  if (boot === undefined) return pid;
  if (boot !== '-' && boot !== bootId()) return null;
  const now = startTime(pid);
  if (start !== undefined && start !== '-' && now !== '-' && start !== now) return null;
  return pid;
}
