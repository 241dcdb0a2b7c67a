#!/usr/bin/env bash
# Benchmarks deckhand-runc against Debian's runc in the same run: `run` (create + start + wait)
# then `delete` of a /bin/true container from the same bundle (busybox-static rootfs, `runc spec`
# config), N times per runtime, interleaved in ABBA batches. Prints median and p99 wall time per
# run+delete and the ratio ours/runc; then the peak memory charged to the container's cgroup
# while it starts (create + start, high-water mark after exit). Release build. Removes everything
# it creates, also when interrupted. Run as root:  hack/bench/runtime.sh [N]   (default 100)
# Two more rows are the machine's floors, floor-runtime.c (built here with cc), each followed by
# one more empty process for the delete: "floor" clones into the same namespaces, chroots and
# execs /bin/true (process and namespace creation alone); "floor-spec" also does the kernel work
# the bundle's config asks of any runtime (cgroups with the devices rules, the mounts, masked and
# read-only paths, device nodes, pivot_root). floor-spec/runc is the lowest ratio a runtime can
# reach here.
set -euo pipefail

N=${1:-100}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
RUNC=${RUNC:-runc}
# crun (Debian's), the C runtime the issue names as the speed to reach, when installed: a third
# column, so the ratios show what this machine allows.
CRUN=${CRUN:-$(command -v crun || true)}
[ "$(id -u)" = 0 ] || { echo "runtime.sh: run as root" >&2; exit 1; }
command -v "$RUNC" >/dev/null || { echo "runtime.sh: $RUNC missing (apt-get install runc)" >&2; exit 1; }
[ -x /bin/busybox ] || { echo "runtime.sh: /bin/busybox missing (apt-get install busybox-static)" >&2; exit 1; }

echo "building release binaries..." >&2
(cd "$ROOT" && cargo build --release -q -p deckhand-cri --bin deckhand-runc)
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
OURS=${TARGET_DIR:-$ROOT/target}/release/deckhand-runc

IMPLS="ours ref floor floor-spec"; [ -n "$CRUN" ] && IMPLS="ours ref crun floor floor-spec"
bin_of() { case $1 in ours) echo "$OURS" ;; ref) echo "$RUNC" ;; crun) echo "$CRUN" ;; esac; }

WORK=$(mktemp -d /tmp/dh-bench-runtime.XXXXXX)
FLOOR=$WORK/floor-runtime
cleanup() {
  set +e
  for r in ours ref crun; do
    bin=$(bin_of $r)
    for d in "$WORK/root-$r"/*/; do
      [ -d "$d" ] && "$bin" --root "$WORK/root-$r" delete --force "$(basename "$d")" >/dev/null 2>&1
    done
  done
  # floor-runtime --spec's cgroups, if it was killed before removing them.
  for d in /sys/fs/cgroup/dhfloor-* /sys/fs/cgroup/*/dhfloor-*; do [ -d "$d" ] && rmdir "$d"; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
cc -O2 -o "$FLOOR" "$ROOT/hack/bench/floor-runtime.c" || { echo "runtime.sh: cc failed on floor-runtime.c" >&2; exit 1; }

B=$WORK/bundle
mkdir -p "$B/rootfs/bin" "$B/rootfs/proc" "$B/rootfs/dev" "$B/rootfs/sys"
cp /bin/busybox "$B/rootfs/bin/busybox"
ln -s busybox "$B/rootfs/bin/true"
(cd "$B" && "$RUNC" spec)
sed -i -e 's/"terminal": true/"terminal": false/' -e 's/"sh"$/"\/bin\/true"/' "$B/config.json"
grep -q '"/bin/true"' "$B/config.json" || { echo "runtime.sh: could not set the process args" >&2; exit 1; }

# one IMPL I: run + delete of container dhbench-IMPL-I; appends the wall time (ns). The clock is
# $EPOCHREALTIME (µs): no process of the shell's is timed with the runtime's.
one() {
  local bin; bin=$(bin_of "$1")
  local id=dhbench-$1-$2 t0 t1
  if [ "${1%-spec}" = floor ]; then
    local mode=(); [ "$1" = floor-spec ] && mode=(--spec)
    t0=${EPOCHREALTIME/./}
    "$FLOOR" "${mode[@]}" "$B/rootfs" >/dev/null 2>"$WORK/err" || {
      echo "runtime.sh: floor-runtime failed: $(cat "$WORK/err")" >&2; return 1; }
    "$FLOOR" >/dev/null 2>&1
    t1=${EPOCHREALTIME/./}
  else
    t0=${EPOCHREALTIME/./}
    "$bin" --root "$WORK/root-$1" run --bundle "$B" "$id" >/dev/null 2>"$WORK/err" || {
      echo "runtime.sh: $1 run failed: $(cat "$WORK/err")" >&2; return 1; }
    "$bin" --root "$WORK/root-$1" delete --force "$id" >/dev/null 2>&1 || true
    t1=${EPOCHREALTIME/./}
  fi
  echo $(((t1 - t0) * 1000)) >>"$WORK/$1"
}

# crun refuses some layouts (on a hybrid host with a controller in the cgroup2 tree: "cgroups in
# hybrid mode not supported"): then it is left out, with its reason.
if [ -n "$CRUN" ] && ! one crun probe 2>"$WORK/crun-err"; then
  echo "runtime.sh: crun left out: $(tail -1 "$WORK/crun-err")" >&2
  CRUN=; IMPLS="ours ref floor floor-spec"
fi
# Warm up (page cache, first cgroup creation).
for i in 1 2 3; do for impl in $IMPLS; do one "$impl" "w$i"; done; done
for impl in $IMPLS; do : >"$WORK/$impl"; done
half=$((N / 2))
for order in "$IMPLS" "$(echo "$IMPLS" | tr ' ' '\n' | tac | tr '\n' ' ')"; do
  for impl in $order; do
    for i in $(seq 1 "$half"); do one "$impl" "${order// /}-$i"; done
  done
done

stat() { # file -> "median p99" in ms
  sort -n "$1" | awk '{a[NR]=$1} END {
    m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
    p = a[int(NR * 0.99 + 0.999)]; if (p == "") p = a[NR]
    printf "%.2f %.2f", m / 1e6, p / 1e6 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }
# Peak memory charged to the container's cgroup while it starts: create + start of the same
# /bin/true container with a cgroupsPath of its own, then the memory controller's high-water mark
# (v1 memory.max_usage_in_bytes, v2 memory.peak) once it has exited, before delete.
MB=$WORK/bundle-mem
mkdir -p "$MB"
sed -e 's/"linux": {/"linux": {"cgroupsPath": "\/dhbench-mem",/' \
  -e "s|\"path\": \"rootfs\"|\"path\": \"$B/rootfs\"|" "$B/config.json" >"$MB/config.json"
grep -q dhbench-mem "$MB/config.json" || { echo "runtime.sh: could not set cgroupsPath" >&2; exit 1; }
if [ -d /sys/fs/cgroup/memory ]; then PEAK=/sys/fs/cgroup/memory/dhbench-mem/memory.max_usage_in_bytes
else PEAK=/sys/fs/cgroup/dhbench-mem/memory.peak; fi
mem_one() { # IMPL I: appends the peak bytes
  local bin; bin=$(bin_of "$1")
  local id=dhbench-mem-$1-$2 st
  "$bin" --root "$WORK/root-$1" create --bundle "$MB" "$id" </dev/null >/dev/null 2>"$WORK/err" || {
    echo "runtime.sh: $1 create failed: $(cat "$WORK/err")" >&2; return 1; }
  "$bin" --root "$WORK/root-$1" start "$id"
  for _ in $(seq 200); do
    st=$("$bin" --root "$WORK/root-$1" state "$id" 2>/dev/null | tr -d ' \n')
    case $st in *'"status":"stopped"'*) break ;; esac
    sleep 0.01
  done
  cat "$PEAK" >>"$WORK/mem-$1" 2>/dev/null || echo "runtime.sh: no $PEAK" >&2
  "$bin" --root "$WORK/root-$1" delete --force "$id" >/dev/null 2>&1 || true
}
for i in $(seq 1 10); do for impl in ${IMPLS% floor floor-spec}; do mem_one "$impl" "$i"; done; done
kib() { sort -n "$1" | awk '{a[NR]=$1} END { printf "%.0f", a[int((NR + 1) / 2)] / 1024 }'; }

read -r om op <<<"$(stat "$WORK/ours")"
read -r rm rp <<<"$(stat "$WORK/ref")"
printf '\n%s x (run + delete) of /bin/true, same bundle, ABBA order; ms\n\n' "$((2 * half))"
printf '%-16s %10s %10s\n' runtime median p99
printf '%-16s %10s %10s\n' deckhand-runc "$om" "$op" runc "$rm" "$rp"
if [ -n "$CRUN" ]; then
  read -r cm cp <<<"$(stat "$WORK/crun")"
  printf '%-16s %10s %10s\n' crun "$cm" "$cp"
fi
read -r fm fp <<<"$(stat "$WORK/floor")"
read -r sm sp <<<"$(stat "$WORK/floor-spec")"
printf '%-16s %10s %10s\n' floor "$fm" "$fp" floor-spec "$sm" "$sp"
printf '%-16s %10s %10s\n' "ours/runc" "$(ratio "$om" "$rm")" "$(ratio "$op" "$rp")"
printf '%-16s %10s %10s\n' "floor/runc" "$(ratio "$fm" "$rm")" "$(ratio "$fp" "$rp")"
printf '%-16s %10s %10s\n' "floor-spec/runc" "$(ratio "$sm" "$rm")" "$(ratio "$sp" "$rp")"
printf '%-16s %10s %10s\n' "ours/floor-spec" "$(ratio "$om" "$sm")" "$(ratio "$op" "$sp")"
if [ -n "$CRUN" ]; then
  printf '%-16s %10s %10s\n' "crun/runc" "$(ratio "$cm" "$rm")" "$(ratio "$cp" "$rp")"
  printf '%-16s %10s %10s\n' "ours/crun" "$(ratio "$om" "$cm")" "$(ratio "$op" "$cp")"
fi
if [ -s "$WORK/mem-ours" ] && [ -s "$WORK/mem-ref" ]; then
  mo=$(kib "$WORK/mem-ours"); mr=$(kib "$WORK/mem-ref")
  printf '\npeak memory charged to the container cgroup during start (median of 10); KiB\n\n'
  printf '%-16s %10s\n' deckhand-runc "$mo" runc "$mr"
  [ -s "$WORK/mem-crun" ] && printf '%-16s %10s\n' crun "$(kib "$WORK/mem-crun")"
  printf '%-16s %10s\n' "ours/runc" "$(ratio "$mo" "$mr")"
fi
