// Crash points for the crash harness (test/crash): STRATA_CRASH_AT=name:n
// kills this process with SIGKILL on the n-th pass through crashPoint(name),
// exactly between two steps of a state change that reaches the disk in more
// than one step. Unset (always, outside tests) it costs an environment lookup.
import * as fs from 'fs';

export const CRASH_POINTS = [
  'zero.journaled',   // a zero record appended, not yet synced; the blocks still hold their data
  'zero.synced',      // the record is on disk, the hole not yet punched
  'zero.punched',     // the hole punched, the request not yet acknowledged
  'freeze.created',   // a snapshot's new overlay files exist, the manifest does not name them yet
  'freeze.saved',     // the manifest names the frozen overlay, its upload not started
  'upload.stored',    // the snapshot layer is complete in the store, the manifest still names the old base
  'upload.rebased',   // the manifest names the new layer, the frozen overlay's files still exist
  'fold.copied',      // a frozen overlay's changes copied into the current one and synced, the manifest names both
  'fold.saved',       // the manifest no longer names the frozen overlay, its files still exist
] as const;
export type CrashPoint = typeof CRASH_POINTS[number];

// Looked up at every pass, so a test may arm a point late (they are on
// slow paths: zeroing, snapshots).
let seen: string | undefined;
let armed = '';
let left = 0;
let power = false;

export function crashPoint(at: CrashPoint): void {
  const env = process.env.STRATA_CRASH_AT;
  if (env !== seen) {
    seen = env;
    const spec = /^([a-z.-]+):(\d+)(:power)?$/.exec(env ?? '');
    armed = spec?.[1] ?? '';
    left = spec ? Number(spec[2]) : 0;
    power = !!spec?.[3];
  }
  if (at !== armed || --left !== 0) return;
  // name:n:power cuts the machine's power instead (the kernel lane's
  // power-cut test): reboot at once, nothing synced, the page cache lost.
  if (power) fs.writeFileSync('/proc/sysrq-trigger', 'b');
  process.kill(process.pid, 'SIGKILL');
}
