#!/usr/bin/env bash
# NBD over TLS against plain NBD, for one or more checkouts in the same run:
#   bash bench/tls.sh [ROOT ...]    (default: this checkout; e.g. a worktree of an older commit as a second peer)
# Each checkout's daemon imports a 256 MiB random image and serves it on its
# unix socket with TLS offered (a pre-shared key); nbdcopy reads the whole
# device warm, in its default requests and in 4 KiB requests (16 in flight,
# one connection), over TLS (nbds+unix) and plain. ROUNDS rounds (default 2),
# checkouts interleaved, 3 reads per cell; prints seconds per read.
set -euo pipefail
roots=("$@"); [ ${#roots[@]} -gt 0 ] || roots=("$(cd "$(dirname "$0")/.." && pwd)")
command -v nbdcopy >/dev/null || { echo "bench/tls.sh needs nbdcopy (apt-get install libnbd-bin)" >&2; exit 2; }
dir=$(mktemp -d /tmp/strata-bench-tls.XXXXXX); trap 'rm -rf "$dir"' EXIT
head -c $((256 << 20)) /dev/urandom > "$dir/img"
printf 'bench:%s\n' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$dir/keys.psk"; chmod 600 "$dir/keys.psk"
secs() { local t0 t1; t0=$(date +%s%N); nbdcopy "$@" null:; t1=$(date +%s%N); echo "scale=3; ($t1 - $t0) / 1000000000" | bc; }
for round in $(seq 1 "${ROUNDS:-2}"); do
  for root in "${roots[@]}"; do
    d="$dir/d"; rm -rf "$d"; mkdir -p "$d"
    node "$root/src/server.js" --data "$d" --import "$dir/img" --tls on --tls-psk "$dir/keys.psk" > "$d/log" 2>&1 & pid=$!
    for _ in $(seq 1 600); do grep -q '"msg":"imported"' "$d/log" && break; sleep 0.1; done
    layer=$(sed -n 's/.*"layer":"\([^"]*\)".*"msg":"imported".*/\1/p' "$d/log" | head -1)
    [ -n "$layer" ] || { echo "daemon of $root did not import:"; tail "$d/log"; kill $pid; exit 1; }
    tls="nbds+unix://bench@/$layer/dev?socket=$d/nbd.sock&tls-psk-file=$dir/keys.psk"
    plain="nbd+unix:///$layer/dev?socket=$d/nbd.sock"
    nbdcopy "$plain" null:  # warm the template cache
    for u in tls plain; do
      uri=${!u}
      echo "round $round $(basename "$root") $u: whole device $(for _ in 1 2 3; do secs "$uri"; done | tr '\n' ' ')s;" \
        "4 KiB requests $(for _ in 1 2 3; do secs --request-size=4096 --requests=16 --connections=1 "$uri"; done | tr '\n' ' ')s"
    done
    kill $pid; wait $pid 2>/dev/null || true
  done
done
