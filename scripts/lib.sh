# Shell functions shared by scripts/vm/run-in-vm.sh and scripts/sandbox/image.sh (sourced).

# Debian mirror URL(s) derived from the host's apt sources (one-line and
# deb822 formats).  Prints "URI SUITE SIGNED_BY" for every Debian suite found.
host_debian_sources() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    sed -e 's/#.*//' "$f" | awk '
      $1 == "deb" {
        sb = "-"; i = 2
        if ($2 ~ /^\[/) {                       # [opt=val ...]
          while (i <= NF) { if ($i ~ /signed-by=/) { sb = $i; sub(/.*signed-by=/, "", sb); sub(/\]$/, "", sb) }
                            if ($i ~ /\]$/) { i++; break }; i++ }
        }
        print $i, $(i+1), sb
      }'
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v RS= -F '\n' '
      {
        types = ""; uris = ""; suites = ""; sb = "-"; enabled = "yes"
        for (i = 1; i <= NF; i++) {
          line = $i; if (line ~ /^#/) continue
          split(line, kv, ":[ \t]*"); key = tolower(kv[1]); val = substr(line, index(line, ":") + 1)
          gsub(/^[ \t]+|[ \t]+$/, "", val)
          if (key == "types") types = val; else if (key == "uris") uris = val
          else if (key == "suites") suites = val; else if (key == "signed-by") sb = val
          else if (key == "enabled") enabled = tolower(val)
        }
        if (types !~ /(^| )deb( |$)/ || enabled == "no" || uris == "") next
        split(uris, u, /[ \t]+/); n = split(suites, s, /[ \t]+/)
        for (j = 1; j <= n; j++) print u[1], s[j], sb
      }' "$f"
  done
}


# copy_modules MODDIR DEST MODULE... : the modules and everything they depend
# on (from MODDIR/modules.dep, dependencies first), decompressed into
# DEST/NAME.ko and listed in load order in DEST/load.list. Modules built into
# the kernel are skipped; ones it lacks altogether are warned about.
copy_modules() {
  local moddir=$1 dest=$2; shift 2
  local -A FILE=() DEPS=() SEEN=()
  local -a ORDER=()
  local line path deps name m
  while IFS= read -r line; do
    path=${line%%:*}; deps=${line#*:}
    name=${path##*/}; name=${name%%.ko*}; name=${name//-/_}
    FILE[$name]=$path; DEPS[$name]=$deps
  done < "$moddir/modules.dep"
  add_mod() {
    local n=${1//-/_} d
    [ -z "${SEEN[$n]:-}" ] || return 0; SEEN[$n]=1
    if [ -z "${FILE[$n]:-}" ]; then
      grep -q "/$n.ko" "$moddir/modules.builtin" 2>/dev/null || echo "warning: module $n not found in $moddir" >&2
      return 0
    fi
    local d
    for d in ${DEPS[$n]}; do d=${d##*/}; add_mod "${d%%.ko*}"; done
    ORDER+=("$n")
  }
  for m in "$@"; do add_mod "$m"; done
  : > "$dest/load.list"
  for m in "${ORDER[@]}"; do
    path=$moddir/${FILE[$m]}
    case $path in
      *.ko.xz) xz -dc "$path" > "$dest/$m.ko";;
      *.ko.zst) zstd -qdc "$path" > "$dest/$m.ko";;
      *.ko.gz) gzip -dc "$path" > "$dest/$m.ko";;
      *) cp "$path" "$dest/$m.ko";;
    esac
    echo "$m" >> "$dest/load.list"
  done
}


# guest_init_preamble NAME: the first lines of a busybox initramfs's /init
# (the lane's and the sandbox's): busybox applets on PATH, /proc, /sys and
# /dev mounted, and load_modules, which insmods what copy_modules listed, in
# order (NAME starts its messages).
guest_init_preamble() {
  cat <<EOF
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
load_modules() {
  while read -r m; do
    [ -n "\$m" ] || continue
    insmod "/lib/modules/\$m.ko" || echo "$1: insmod \$m failed"
  done < /lib/modules/load.list
}
EOF
}
