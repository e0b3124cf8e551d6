#!/usr/bin/env bash
# bench:ublk — runs bench/ublk.ts inside QEMU guests (this host has no
# ublk_drv). Kernels: $STRATA_BENCH_KERNELS (default "7.3 6.12").
set -uo pipefail
cd "$(dirname "$0")/.."
rc=0
kernels=${STRATA_BENCH_KERNELS:-7.3 6.12}
for k in $kernels; do
  scripts/vm/run-in-vm.sh --kernel "$k" --modules ublk_drv,loop,ext4,crc32c_generic --mem 4096 --timeout 1800 \
    --env STRATA_BENCH_SECONDS="${STRATA_BENCH_SECONDS:-}" --env STRATA_BENCH_FILE_MB="${STRATA_BENCH_FILE_MB:-}" \
    --env STRATA_BENCH_PEERS="${STRATA_BENCH_PEERS:-}" --env STRATA_BENCH_ROUNDS="${STRATA_BENCH_ROUNDS:-}" \
    --env STRATA_BENCH_PREV="${STRATA_BENCH_PREV:-}" --env STRATA_BENCH_TMP="${STRATA_BENCH_TMP:-}" --env STRATA_BENCH_QUEUES="${STRATA_BENCH_QUEUES:-}" --env STRATA_BENCH_FS="${STRATA_BENCH_FS:-}" --env STRATA_BENCH_CPU="${STRATA_BENCH_CPU:-}" \
    -- node -r tsx/cjs bench/ublk.ts || rc=$?
done
exit $rc
