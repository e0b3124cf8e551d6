#!/usr/bin/env bash
# The template cache across a host reboot (test/vm/cache-reboot.ts): two VM
# boots over one virtio disk; the first ends in a power cut (sysrq b, QEMU
# exits without a status), the second checks what survived.
#   test/vm/cache-reboot.sh KERNEL        (from the kernel lane, scripts/vm/lane.sh)
set -uo pipefail
cd "$(dirname "$0")/../.."
kernel=${1:?kernel}
disk=$(mktemp /tmp/strata-reboot.XXXXXX.img) out=$(mktemp)
trap 'rm -f "$disk" "$out"' EXIT
truncate -s 512M "$disk"
vm() {
  scripts/vm/run-in-vm.sh --kernel "$kernel" --modules ext4,crc32c_generic,crc32c_intel --mem 2048 --timeout 900 --timing \
    --disk "$disk" -- node -r tsx/cjs test/vm/cache-reboot.ts "$1"
}
vm boot1 2>&1 | tee "$out"; rc=${PIPESTATUS[0]}
if ! grep -q '^BOOT1-DONE' "$out" || grep -q '^FAIL' "$out"; then
  echo "cache-reboot: boot 1 failed (exit $rc)"; exit 1
fi
[ "$rc" -ne 0 ] || { echo "cache-reboot: boot 1 exited 0: the power cut did not end it"; exit 1; }
echo "cache-reboot: boot 1 ended in the power cut (run-in-vm exit $rc, as expected)"
vm boot2
