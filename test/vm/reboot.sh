#!/usr/bin/env bash
# A test across a power cut: two VM boots over one virtio disk. Boot 1 runs
# `TEST boot1 ARGS…` and must end in a power cut (sysrq b: QEMU exits without
# a status) after printing BOOT1-DONE; boot 2 runs `TEST boot2 ARGS…` on what
# survived. Used by the kernel lane (scripts/vm/lane.sh):
#   test/vm/reboot.sh KERNEL TEST.ts [ARGS…]
set -uo pipefail
cd "$(dirname "$0")/../.."
kernel=${1:?kernel} test=${2:?test}
shift 2
disk=$(mktemp /tmp/strata-reboot.XXXXXX.img) out=$(mktemp)
trap 'rm -f "$disk" "$out"' EXIT
truncate -s 512M "$disk"
name="$(basename "$test" .ts)${*:+ $*}"
vm() {
  scripts/vm/run-in-vm.sh --kernel "$kernel" --modules ext4,crc32c_generic,crc32c_intel --mem 2048 --timeout 900 --timing \
    --disk "$disk" -- node -r tsx/cjs "$test" "$@"
}
vm boot1 "$@" 2>&1 | tee "$out"; rc=${PIPESTATUS[0]}
if ! grep -q '^BOOT1-DONE' "$out" || grep -q '^FAIL' "$out"; then
  echo "$name: boot 1 failed (exit $rc)"; exit 1
fi
[ "$rc" -ne 0 ] || { echo "$name: boot 1 exited 0: the power cut did not end it"; exit 1; }
echo "$name: boot 1 ended in the power cut (run-in-vm exit $rc, as expected)"
vm boot2 "$@"
