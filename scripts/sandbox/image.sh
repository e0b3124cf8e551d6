#!/usr/bin/env bash
# image.sh - the sandbox guest: a small Debian bookworm root filesystem (ext4,
# raw) that boots with systemd from /dev/vda, and a tiny busybox initramfs for
# a lane kernel (scripts/vm/run-in-vm.sh) that mounts /dev/vda and
# switch_roots into /sbin/init. See docs/sandbox.md.
#
#   scripts/sandbox/image.sh                 # prints the image path
#   scripts/sandbox/image.sh --kernel 7.3    # prints SANDBOX_IMAGE=, SANDBOX_ABI=,
#                                            # SANDBOX_KERNEL=, SANDBOX_INITRD=,
#                                            # SANDBOX_KERNEL_NBD= (1: nbd-client is in
#                                            # the initramfs) lines
#
# Both are built once and cached under ${RUN_IN_VM_CACHE:-~/.cache/run-in-vm}/sandbox/,
# keyed by a hash of this script (an edit rebuilds them). The kernel is the
# lane's: taken from the run-in-vm cache (kernels/<abi>), fetched there by a
# short run-in-vm.sh run when missing.
#
# The guest: root on /dev/vda (no fstab entry, no udev, journald volatile,
# no network, no getty), and two units of its own:
#   strata-ready.service  prints "STRATA-READY <uptime>" on /dev/ttyS0 once
#                         multi-user.target is reached
#   strata-agent.service  on /dev/ttyS1 (raw): reads one command line at a
#                         time, runs it with sh (stdin /dev/null, stdout and
#                         stderr to the port), then prints "\nSTRATA-DONE <status>"
#
# Exit status: 0; 3 when a prerequisite is missing (said on stderr as
# "missing: ..."); 1 on any other failure.
#
# Options: --kernel SPEC (7.3, 6.12 or a full ABI), --size MIB (default 1024),
# --rebuild (ignore the cache). Needs root (mmdebstrap in root mode,
# ownership kept by mkfs.ext4 -d), mmdebstrap (apt-get installed when
# missing), mkfs.ext4, a static busybox, cpio, gzip, xz.
set -euo pipefail

PROG=${0##*/}
die() { echo "$PROG: $*" >&2; exit 1; }
missing() { echo "$PROG: missing: $*" >&2; exit 3; }   # a prerequisite, not a bug
note() { echo "$PROG: $*" >&2; }

HERE=$(cd "$(dirname "$0")" && pwd -P)
SELF=$HERE/${0##*/}
KSPEC="" SIZE_MIB=1024 REBUILD=0
while [ $# -gt 0 ]; do
  case $1 in
    --kernel) KSPEC=$2; shift 2;;
    --size) SIZE_MIB=$2; shift 2;;
    --rebuild) REBUILD=1; shift;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0;;
    *) die "unknown option '$1'";;
  esac
done

CACHE=${RUN_IN_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/run-in-vm}
OUT=$CACHE/sandbox
mkdir -p "$OUT"
KEY=$( { sha256sum < "$SELF"; echo "$SIZE_MIB"; } | sha256sum | cut -c1-16)
IMAGE=$OUT/bookworm-$KEY.ext4

exec 9>"$OUT/.lock"
flock -w 3600 9 || die "cannot lock $OUT/.lock"

need_root() { [ "$(id -u)" = 0 ] || missing "root: $1 needs it"; }

# ------------------------------------------------------------------- mirror
# Debian sources of this machine ("URI SUITE SIGNED_BY" lines), from one-line
# and deb822 files: host_debian_sources, shared with the kernel lane.
# shellcheck source=../lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

# ------------------------------------------------------------------- image
build_image() {
  need_root "building the image"
  if ! command -v mmdebstrap >/dev/null; then
    note "mmdebstrap is missing; installing it with apt-get"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap; } >&2 \
      || missing "mmdebstrap (apt-get could not install it: apt-get install mmdebstrap)"
  fi
  command -v mkfs.ext4 >/dev/null || missing "mkfs.ext4 (apt-get install e2fsprogs)"
  local mirrors=() uri suite sb
  while read -r uri suite sb; do
    [[ $suite =~ ^bookworm(-updates|-security)?$ ]] || continue
    if [ "$sb" = - ]; then mirrors+=("deb $uri $suite main"); else mirrors+=("deb [signed-by=$sb] $uri $suite main"); fi
  done < <(host_debian_sources | sort -u)
  [ ${#mirrors[@]} -gt 0 ] || missing "a bookworm source in /etc/apt/sources* (cannot pick a mirror)"
  local tmp root
  tmp=$(mktemp -d "$OUT/.build.XXXXXX")
  trap 'rm -rf "$tmp"' RETURN
  root=$tmp/root
  note "mmdebstrap bookworm minbase from: ${mirrors[*]}"
  mmdebstrap --mode=root --variant=minbase --format=directory \
    --include=systemd-sysv,e2fsprogs,util-linux,coreutils \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --aptopt='APT::Install-Recommends "false"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb' \
    bookworm "$root" "${mirrors[@]}" >&2 || die "mmdebstrap failed"

  # --- guest configuration
  echo sandbox > "$root/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 sandbox\n' > "$root/etc/hosts"
  # A fixed machine id: no first-boot unit presets.
  echo 5374726174615361616e64626f780001 > "$root/etc/machine-id"
  printf '# root is mounted read-write by the initramfs\n' > "$root/etc/fstab"
  mkdir -p "$root/etc/systemd/journald.conf.d" "$root/etc/systemd/system.conf.d"
  printf '[Journal]\nStorage=volatile\nForwardToConsole=no\n' > "$root/etc/systemd/journald.conf.d/sandbox.conf"
  printf '[Manager]\nShowStatus=error\nDefaultTimeoutStartSec=30s\nDefaultTimeoutStopSec=15s\n' > "$root/etc/systemd/system.conf.d/sandbox.conf"
  ln -sf /lib/systemd/system/multi-user.target "$root/etc/systemd/system/default.target"
  # Units this guest does not need (most are not installed by minbase; masking
  # a missing one is harmless).
  local u
  for u in getty@.service serial-getty@.service getty.target console-getty.service \
           systemd-logind.service systemd-networkd.service systemd-networkd-wait-online.service \
           systemd-resolved.service systemd-timesyncd.service systemd-udevd.service \
           systemd-udev-trigger.service systemd-udev-settle.service systemd-udevd-control.socket \
           systemd-udevd-kernel.socket systemd-random-seed.service systemd-update-utmp.service \
           systemd-update-utmp-runlevel.service systemd-journal-flush.service systemd-hwdb-update.service \
           systemd-pstore.service systemd-firstboot.service systemd-machine-id-commit.service \
           systemd-binfmt.service proc-sys-fs-binfmt_misc.automount sys-kernel-debug.mount \
           sys-kernel-tracing.mount dev-mqueue.mount dev-hugepages.mount sys-fs-fuse-connections.mount \
           sys-kernel-config.mount systemd-remount-fs.service systemd-fsck-root.service \
           apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
           e2scrub_reap.service fstrim.timer systemd-tmpfiles-clean.timer cron.service \
           systemd-ask-password-wall.path systemd-ask-password-console.path; do
    ln -sf /dev/null "$root/etc/systemd/system/$u"
  done
  install -d "$root/usr/local/sbin" "$root/etc/systemd/system/multi-user.target.wants"
  cat > "$root/usr/local/sbin/strata-agent" <<'EOF'
#!/bin/sh
# strata-agent: the host's shell on /dev/ttyS1. One command line at a time,
# run with sh; its output, then "\nSTRATA-DONE <exit status>".
TTY=${1:-/dev/ttyS1}
stty -F "$TTY" raw -echo -echoe -echok -echoctl -echoke 115200 || exit 1
exec <"$TTY" >"$TTY" 2>&1
while IFS= read -r line; do
  [ -n "$line" ] || continue
  sh -c "$line" </dev/null
  printf '\nSTRATA-DONE %d\n' "$?"
done
EOF
  chmod 755 "$root/usr/local/sbin/strata-agent"
  cat > "$root/etc/systemd/system/strata-agent.service" <<'EOF'
[Unit]
Description=strata sandbox agent on ttyS1
DefaultDependencies=no
After=local-fs.target
Conflicts=shutdown.target
Before=shutdown.target

[Service]
# raw mode before the unit counts as started (strata-ready.service is ordered
# after it): the host's first command line is never echoed or mangled
ExecStartPre=/bin/stty -F /dev/ttyS1 raw -echo
ExecStart=/usr/local/sbin/strata-agent /dev/ttyS1
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
EOF
  cat > "$root/etc/systemd/system/strata-ready.service" <<'EOF'
[Unit]
Description=strata sandbox ready marker on ttyS0
After=multi-user.target strata-agent.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "STRATA-READY $(cut -d" " -f1 /proc/uptime)" > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
EOF
  ln -sf ../strata-agent.service "$root/etc/systemd/system/multi-user.target.wants/strata-agent.service"
  ln -sf ../strata-ready.service "$root/etc/systemd/system/multi-user.target.wants/strata-ready.service"
  mkdir -p "$root/root/strata"

  local used
  used=$(du -sm "$root" | cut -f1)
  note "root filesystem: ${used} MiB; image ${SIZE_MIB} MiB"
  [ "$used" -lt $((SIZE_MIB * 3 / 4)) ] || die "root filesystem (${used} MiB) does not fit a ${SIZE_MIB} MiB image"
  rm -f "$tmp/image"
  truncate -s "${SIZE_MIB}M" "$tmp/image"
  mkfs.ext4 -q -F -L sandbox-root -E lazy_itable_init=0,lazy_journal_init=0 -d "$root" "$tmp/image" >&2 || die "mkfs.ext4 -d failed"
  e2fsck -fn "$tmp/image" >/dev/null 2>&1 || die "the new image does not pass e2fsck -fn"
  rm -f "$OUT"/bookworm-*.ext4     # images of older versions of this script
  mv "$tmp/image" "$IMAGE"
}

if [ "$REBUILD" = 1 ] || [ ! -s "$IMAGE" ]; then build_image; fi

if [ -z "$KSPEC" ]; then echo "$IMAGE"; exit 0; fi

# ---------------------------------------------------------------- initramfs
cached_kver() {   # newest complete lane kernel matching SPEC
  local spec=$1 d best="" re
  re=${spec//./\\.}; re=${re//+/\\+}
  for d in "$CACHE"/kernels/*/; do
    d=${d%/}; d=${d##*/}
    [ -f "$CACHE/kernels/$d/.complete" ] || continue
    if [ "$d" = "$spec" ] || [[ $d =~ ^${re}\.[0-9]+\+deb[0-9]+-amd64$ ]]; then best+="$d"$'\n'; fi
  done
  printf '%s' "$best" | sed '/^$/d' | sort -V | tail -n1
}
ABI=$(cached_kver "$KSPEC")
if [ -z "$ABI" ]; then
  note "kernel $KSPEC is not in $CACHE/kernels; fetching it with a short run-in-vm.sh run"
  flock -u 9
  "$HERE/../vm/run-in-vm.sh" --kernel "$KSPEC" --no-cwd --smp 1 --timeout 300 -- true >&2 \
    || missing "kernel $KSPEC (run-in-vm.sh could not fetch or boot it)"
  flock -w 3600 9 || die "cannot lock $OUT/.lock"
  ABI=$(cached_kver "$KSPEC")
  [ -n "$ABI" ] || die "kernel $KSPEC still missing from $CACHE/kernels"
fi
KDIR=$CACHE/kernels/$ABI
MODDIR=$KDIR/lib/modules/$ABI
[ -f "$KDIR/vmlinuz" ] && [ -f "$MODDIR/modules.dep" ] || die "incomplete kernel dir $KDIR"

BUSYBOX=${RUN_IN_VM_BUSYBOX:-$(command -v busybox || true)}
[ -x "$BUSYBOX" ] || missing "a static busybox (apt-get install busybox-static)"
if LC_ALL=C readelf -l "$BUSYBOX" 2>/dev/null | grep -q INTERP; then
  missing "a static busybox: $BUSYBOX is dynamically linked (apt-get install busybox-static)"
fi

# Modules to mount an ext4 root on virtio-blk or on the kernel's nbd driver
# over virtio-net. virtio_pci is built in on both lane kernels; crc32c for
# ext4's metadata checksums is a crypto module on 6.12 (loaded on demand, which
# this initramfs cannot do) and a built-in library on 7.x. Names missing from
# modules.dep are built in (or absent): skipped.
INIT_MODULES="virtio_pci virtio_blk virtio_net nbd crc32c_generic crc32c_intel crc32c_cryptoapi ext4"

# The kernel nbd driver's root needs a userspace client to hand it the
# connected socket: Debian's nbd-client (the host's, with its libraries).
NBD_CLIENT=$(command -v nbd-client || true)
[ -n "$NBD_CLIENT" ] || NBD_CLIENT=$( [ -x /usr/sbin/nbd-client ] && echo /usr/sbin/nbd-client || true)
if [ -z "$NBD_CLIENT" ]; then
  note "nbd-client is missing; installing it with apt-get"
  if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nbd-client; } >&2; then
    NBD_CLIENT=/usr/sbin/nbd-client
  else
    note "missing: nbd-client (apt-get could not install it): the initramfs cannot boot from the kernel nbd driver"
  fi
fi

IFS= read -r -d '' INIT <<'EOF_INIT' || true
exec </dev/console >/dev/console 2>&1
fail() { echo "strata-initramfs: FATAL: $*"; sleep 1; poweroff -f; sleep 10; }
load_modules
ROOT=/dev/vda RW=rw NBD=""
for a in $(cat /proc/cmdline); do
  case $a in root=/dev/*) ROOT=${a#root=};; ro) RW=ro;; rw) RW=rw;; strata.nbd=*) NBD=${a#strata.nbd=};; esac
done
# strata.nbd=HOST:PORT/EXPORT: the root is /dev/nbd0, the kernel's nbd driver
# connected over eth0 (QEMU user networking: the guest is 10.0.2.15, the host
# 10.0.2.2) to that export.
if [ -n "$NBD" ]; then
  ip link set lo up; ip link set eth0 up || fail "no eth0 for strata.nbd"
  ip addr add 10.0.2.15/24 dev eth0
  h=${NBD%%:*}; p=${NBD#*:}; e=${p#*/}; p=${p%%/*}
  nbd-client "$h" "$p" /dev/nbd0 -N "$e" -b 4096 || fail "nbd-client $NBD failed"
  ROOT=/dev/nbd0
fi
i=0
while [ ! -b "$ROOT" ] && [ $i -lt 300 ]; do sleep 0.1 2>/dev/null || sleep 1; i=$((i + 1)); done
[ -b "$ROOT" ] || fail "$ROOT did not appear"
mkdir -p /newroot
mount -t ext4 -o $RW "$ROOT" /newroot || fail "cannot mount $ROOT"
[ -L /newroot/sbin/init ] || [ -x /newroot/sbin/init ] || fail "no /sbin/init on $ROOT"
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
EOF_INIT
INIT="#!/bin/busybox sh
# PID 1 of the strata sandbox initramfs (scripts/sandbox/image.sh)
$(guest_init_preamble strata-initramfs)
$INIT"

IKEY=$( { printf '%s\n' "$KEY" "$ABI" "$INIT_MODULES" "$INIT"; cksum < "$BUSYBOX"; [ -z "$NBD_CLIENT" ] || cksum < "$NBD_CLIENT"; } | cksum | cut -d' ' -f1)
INITRD=$OUT/initramfs-$ABI-$IKEY.gz
if [ "$REBUILD" = 1 ] || [ ! -s "$INITRD" ]; then
  command -v cpio >/dev/null || missing "cpio (apt-get install cpio)"
  tmp=$(mktemp -d "$OUT/.initramfs.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp"/{bin,dev,proc,sys,newroot,lib/modules}
  cp "$BUSYBOX" "$tmp/bin/busybox"
  # nbd-client and the shared libraries it loads (the dynamic loader too)
  if [ -n "$NBD_CLIENT" ]; then
    cp "$NBD_CLIENT" "$tmp/bin/nbd-client"
    for lib in $(ldd "$NBD_CLIENT" | grep -o '/[^ ]*'); do
      mkdir -p "$tmp$(dirname "$lib")"; cp -L "$lib" "$tmp$lib"
    done
  fi
  printf '%s\n' "$INIT" > "$tmp/init"; chmod 755 "$tmp/init"
  grep -q '/ext4.ko' "$MODDIR/modules.dep" "$MODDIR/modules.builtin" || die "kernel $ABI has no ext4"
  # shellcheck disable=SC2086
  copy_modules "$MODDIR" "$tmp/lib/modules" $INIT_MODULES
  note "initramfs for $ABI: modules $(tr '\n' ' ' < "$tmp/lib/modules/load.list")"
  rm -f "$OUT"/initramfs-"$ABI"-*.gz
  ( cd "$tmp" && find . | cpio -o -H newc --quiet | gzip -1 ) > "$INITRD.tmp" && mv "$INITRD.tmp" "$INITRD"
fi

echo "SANDBOX_IMAGE=$IMAGE"
echo "SANDBOX_ABI=$ABI"
echo "SANDBOX_KERNEL=$KDIR/vmlinuz"
echo "SANDBOX_INITRD=$INITRD"
echo "SANDBOX_KERNEL_NBD=$([ -n "$NBD_CLIENT" ] && echo 1 || echo 0)"
