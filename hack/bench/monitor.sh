#!/usr/bin/env bash
# Memory of the per-container monitor: N busybox `sleep` containers, each under its own
# deckhand-monitor (release build), against N under conmon (Debian's, the C peer) with runc, in the
# same run. Reads /proc/<monitor>/smaps_rollup of every monitor and prints the medians of Rss,
# Pss and Private_Dirty (what one more container costs: the monitor's own pages; the shared
# text of the binary and libc is in Rss and, divided among the monitors, in Pss). Removes
# everything it creates, also when interrupted. Run as root:  hack/bench/monitor.sh [N]   (10)
set -euo pipefail

N=${1:-10}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
[ "$(id -u)" = 0 ] || { echo "monitor.sh: run as root" >&2; exit 1; }
for b in runc conmon /bin/busybox; do
  command -v "$b" >/dev/null || { echo "monitor.sh: $b missing (hack/install-deps.sh)" >&2; exit 1; }
done

echo "building release binaries..." >&2
(cd "$ROOT" && cargo build --release -q -p deckhand-cri --bin deckhand-monitor --bin deckhand-runc)
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
BIN=${TARGET_DIR:-$ROOT/target}/release

WORK=$(mktemp -d /tmp/dh-bench-monitor.XXXXXX)
cleanup() {
  set +e
  for d in "$WORK/root-ours"/*/; do
    [ -d "$d" ] && "$BIN/deckhand-runc" --root "$WORK/root-ours" delete --force "$(basename "$d")" >/dev/null 2>&1
  done
  for d in "$WORK/root-ref"/*/; do
    [ -d "$d" ] && runc --root "$WORK/root-ref" delete --force "$(basename "$d")" >/dev/null 2>&1
  done
  # The monitors exit with their containers; wait for ours (children of this shell) to go.
  wait 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

B=$WORK/bundle
mkdir -p "$B/rootfs/bin" "$B/rootfs/proc" "$B/rootfs/dev" "$B/rootfs/sys"
cp /bin/busybox "$B/rootfs/bin/busybox"
ln -s busybox "$B/rootfs/bin/sleep"
(cd "$B" && runc spec)
sed -i -e 's/"terminal": true/"terminal": false/' -e 's/"sh"$/"\/bin\/sleep", "600"/' "$B/config.json"
grep -q '"/bin/sleep"' "$B/config.json" || { echo "monitor.sh: could not set the process args" >&2; exit 1; }
mkdir -p "$WORK/exit" "$WORK/sock" "$WORK/logs"

: >"$WORK/ours"; : >"$WORK/ref"
for i in $(seq 1 "$N"); do
  id=dhbench-mon-ours-$i
  "$BIN/deckhand-monitor" --root "$WORK/root-ours" --bundle "$B" --id "$id" \
    --log-path "$WORK/logs/$id.log" --pid-file "$WORK/$id.mpid" --report </dev/null >"$WORK/$id.out" 2>&1 &
  echo $! >>"$WORK/ours"
  id=dhbench-mon-ref-$i
  conmon -c "$id" -u "$id" -n "$id" -r "$(command -v runc)" -b "$B" -P "$WORK/$id.mpid" \
    -p "$WORK/$id.cpid" -l "k8s-file:$WORK/logs/$id.log" --exit-dir "$WORK/exit" \
    --socket-dir-path "$WORK/sock" --runtime-arg "--root=$WORK/root-ref" --no-new-keyring </dev/null
  # conmon returns before `runc create` has finished: wait for the container's pid file.
  for _ in $(seq 200); do [ -s "$WORK/$id.cpid" ] && break; sleep 0.02; done
  runc --root "$WORK/root-ref" start "$id"
  cat "$WORK/$id.mpid" >>"$WORK/ref"; echo >>"$WORK/ref"
done
# Let every monitor settle into its steady state.
for i in $(seq 1 "$N"); do
  for _ in $(seq 100); do grep -q '"pid"' "$WORK/dhbench-mon-ours-$i.out" && break; sleep 0.05; done
done
sleep 1

med() { sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }
measure() { # FILE-of-pids -> "rss pss private" medians in KiB
  local f=$1 pid
  for pid in $(cat "$f"); do
    awk '/^Rss:/ {r=$2} /^Pss:/ {p=$2} /^Private_Dirty:/ {d=$2} END {print r, p, d}' \
      "/proc/$pid/smaps_rollup"
  done >"$f.kib"
  echo "$(cut -d' ' -f1 "$f.kib" | med) $(cut -d' ' -f2 "$f.kib" | med) $(cut -d' ' -f3 "$f.kib" | med)"
}
read -r orss opss opriv <<<"$(measure "$WORK/ours")"
read -r rrss rpss rpriv <<<"$(measure "$WORK/ref")"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }
printf '\n%s containers each; per monitor, median; KiB\n\n' "$N"
printf '%-18s %8s %8s %14s\n' monitor Rss Pss Private_Dirty
printf '%-18s %8s %8s %14s\n' deckhand-monitor "$orss" "$opss" "$opriv" conmon "$rrss" "$rpss" "$rpriv"
printf '%-18s %8s %8s %14s\n' "ours/conmon" "$(ratio "$orss" "$rrss")" "$(ratio "$opss" "$rpss")" "$(ratio "$opriv" "$rpriv")"
