#!/usr/bin/env bash
# The kernel test lane: boots Debian kernels that have ublk_drv and nbd in
# QEMU (TCG) and runs the in-VM tests there (this host's kernel has neither
# driver). Usage: scripts/vm/lane.sh [--smoke]   (kernels: $STRATA_VM_KERNELS)
# --smoke shortens the ublk tests (4 MiB pattern + unaligned I/O, 20
# create/destroy cycles, no recovery run).
set -uo pipefail
cd "$(dirname "$0")/../.."
node scripts/bootstrap.js --vm || exit $?
kernels=${STRATA_VM_KERNELS:-"6.12 7.3"}
tests=(test/vm/uring-wakeup.ts test/vm/nbd-kernel.ts
  test/vm/ublk-data.ts test/vm/ublk-lifecycle.ts test/vm/ublk-churn.ts test/vm/ublk-recovery.ts test/vm/ublk-strata.ts
  test/vm/ublk-cold.ts test/vm/writeback-error.ts test/vm/daemon-ublk.ts test/vm/live-snapshot.ts
  test/vm/cache-reboot.sh)
envs=()
if [ "${1:-}" = "--smoke" ]; then
  envs=(--env STRATA_UBLK_SMOKE=1 --env STRATA_UBLK_CYCLES=20)
  tests=(${tests[@]/test\/vm\/ublk-recovery.ts/})
fi
run() {
  # a *.sh test boots its VMs itself (cache-reboot: two boots of one disk)
  case $2 in *.sh) bash "$2" "$1"; return;; esac
  scripts/vm/run-in-vm.sh --kernel "$1" --modules nbd,ublk_drv,loop,ext4,crc32c_generic,crc32c_intel --mem 2048 --timeout 1200 --timing \
    "${envs[@]}" -- node -r tsx/cjs "$2"
}
pass=0; fail=0; retried=0
for k in $kernels; do
  for t in "${tests[@]}"; do
    echo "=== $t on kernel $k"
    out=$(mktemp)
    run "$k" "$t" 2>&1 | tee "$out"; rc=${PIPESTATUS[0]}
    # Exit 132 is SIGILL of the test's node process: seen once so far (ublk-cold
    # on 7.3, 1 of 13 runs, before any output, with no message from V8 or
    # strata, whose addon holds no trapping instruction); suspected in QEMU
    # 7.2's emulation. A guest kernel soft lockup ends in the runner's timeout
    # (exit 124): seen in ublk-recovery on 6.12 (2 of 11 runs on 2026-12-06, a
    # node thread stuck in the kernel for 1000+ s after the server's SIGKILL).
    # Such a test runs once more, said out loud; any other failure counts at once.
    # Not retried, open: ublk-cold on 7.3 died of SIGSEGV (exit 139) in 2 of 9
    # runs on 2026-12-07, after its first zero-copy phase (between the device
    # stats line and the snapshot: ublk device delete, snapshot or close); no
    # crash in 4 runs under gdb, so no backtrace yet. The checkout before the
    # I/O workers (0c35720) passed it 6 of 6: suspect the split of
    # DeviceTarget::plan/finish into acquire/release (1cd5ae8).
    why=""
    if [ "$rc" -eq 132 ]; then why="died of SIGILL (exit 132)"; fi
    if [ "$rc" -eq 124 ] && grep -q "soft lockup" "$out"; then why="timed out after a guest kernel soft lockup (exit 124)"; fi
    rm -f "$out"
    if [ -n "$why" ]; then
      echo "RETRY: $t on kernel $k $why; running it once more"
      retried=$((retried + 1))
      run "$k" "$t"; rc=$?
    fi
    if [ "$rc" -eq 0 ]; then
      pass=$((pass + 1))
    else
      echo "FAIL: $t on kernel $k (exit $rc)"
      fail=$((fail + 1))
    fi
  done
done
echo "vm lane: ${pass} passed, ${fail} failed$([ "$retried" -gt 0 ] && echo ", ${retried} retried (SIGILL or a guest kernel soft lockup)")"
[ "$fail" -eq 0 ]
