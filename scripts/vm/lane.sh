#!/usr/bin/env bash
# The kernel test lane: boots Debian kernels that have ublk_drv and nbd in
# QEMU (TCG) and runs the in-VM tests there (this host's kernel has neither
# driver). Usage: scripts/vm/lane.sh [--smoke]   (kernels: $STRATA_VM_KERNELS)
set -uo pipefail
cd "$(dirname "$0")/../.."
node scripts/bootstrap.js --vm || exit $?
kernels=${STRATA_VM_KERNELS:-"6.12 7.3"}
tests=(test/vm/uring-wakeup.ts test/vm/nbd-kernel.ts)
pass=0; fail=0
for k in $kernels; do
  for t in "${tests[@]}"; do
    echo "=== $t on kernel $k"
    if scripts/vm/run-in-vm.sh --kernel "$k" --modules nbd,ext4,crc32c_generic,crc32c_intel --mem 2048 --timeout 1200 --timing \
        -- node -r tsx/cjs "$t"; then
      pass=$((pass + 1))
    else
      echo "FAIL: $t on kernel $k (exit $?)"
      fail=$((fail + 1))
    fi
  done
done
echo "vm lane: ${pass} passed, ${fail} failed"
[ "$fail" -eq 0 ]
