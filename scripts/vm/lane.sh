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
  "test/vm/reboot.sh test/vm/cache-reboot.ts"
  "test/vm/reboot.sh test/vm/power-cut.ts freeze.saved btrfs" "test/vm/reboot.sh test/vm/power-cut.ts upload.rebased btrfs"
  "test/vm/reboot.sh test/vm/power-cut.ts fold.saved ext4")
envs=()
if [ "${1:-}" = "--smoke" ]; then
  envs=(--env STRATA_UBLK_SMOKE=1 --env STRATA_UBLK_CYCLES=20)
  keep=(); for t in "${tests[@]}"; do [ "$t" = test/vm/ublk-recovery.ts ] || keep+=("$t"); done
  tests=("${keep[@]}")
fi
# A test process that crashes leaves a core dump here (the guest writes it
# through the scratch share); the lane prints its backtrace (gdb on the host
# reads it: the guest runs the host's own node and addon).
cores=$(mktemp -d /tmp/strata-vm-cores.XXXXXX)
trap 'rm -rf "$cores"' EXIT
run() {
  # A test is a file and its arguments; a *.sh test boots its VMs itself
  # (reboot.sh: two boots of one disk around a power cut).
  local -a t=($2)
  case ${t[0]} in *.sh) bash "${t[0]}" "$1" "${t[@]:1}"; return;; esac
  scripts/vm/run-in-vm.sh --kernel "$1" --modules nbd,ublk_drv,loop,ext4,crc32c_generic,crc32c_intel --mem 2048 --timeout 1200 --timing \
    --scratch "$cores" --append "sysctl.kernel.core_pattern=/scratch/core.%p" \
    "${envs[@]}" -- prlimit --core=unlimited node -r tsx/cjs "${t[@]}"
}
backtraces() {
  for c in "$cores"/core.*; do
    [ -e "$c" ] || continue
    echo "--- core dump $(basename "$c") of $1; backtrace of the crashing thread, then every thread's top frames:"
    if command -v gdb >/dev/null; then
      gdb -batch -nx -ex bt -ex "thread apply all bt 8" "$(command -v node)" "$c" 2>&1 | grep -v '^\[New LWP' | head -300
    else
      echo "(gdb is not installed: no backtrace)"
    fi
    rm -f "$c"
  done
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
    # Exit 139 is SIGSEGV: ublk-cold on 7.3 died of it in 4 of about 20 runs
    # on 2026-12-06/07 (after its zero-copy phase), then in none of 26 runs on
    # 2026-12-07 with core dumps on; not explained. Its backtrace is printed
    # and it runs once more, said out loud, until one is caught.
    backtraces "$t on kernel $k"
    why=""
    if [ "$rc" -eq 132 ]; then why="died of SIGILL (exit 132)"; fi
    if [ "$rc" -eq 139 ]; then why="died of SIGSEGV (exit 139; backtrace above)"; fi
    if [ "$rc" -eq 124 ] && grep -q "soft lockup" "$out"; then why="timed out after a guest kernel soft lockup (exit 124)"; fi
    rm -f "$out"
    if [ -n "$why" ]; then
      echo "RETRY: $t on kernel $k $why; running it once more"
      retried=$((retried + 1))
      run "$k" "$t"; rc=$?
      backtraces "$t on kernel $k (retry)"
    fi
    if [ "$rc" -eq 0 ]; then
      pass=$((pass + 1))
    else
      echo "FAIL: $t on kernel $k (exit $rc)"
      fail=$((fail + 1))
    fi
  done
done
echo "vm lane: ${pass} passed, ${fail} failed$([ "$retried" -gt 0 ] && echo ", ${retried} retried (SIGILL, SIGSEGV or a guest kernel soft lockup)")"
[ "$fail" -eq 0 ]
