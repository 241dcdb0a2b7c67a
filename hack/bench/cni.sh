#!/usr/bin/env bash
# Benchmarks deckhand-bridge + deckhand-host-local against the reference bridge + host-local
# (containernetworking-plugins in /usr/lib/cni) in the same run: N network namespaces
# (dh-bench-…), ADD then DEL each, per configuration. Prints median and p99 per operation, the
# batch time and the ratios ours/reference, then the kernel's floor for DEL (a bare
# `ip link del` of the same veth pair). Release build. Removes everything it creates, also
# when interrupted. Run as root:  hack/bench/cni.sh [N]   (default 50)
# The machine should be quiet: both sides run in the same process tree, so the ratios survive some
# load, but not the absolute figures; run it a few times and compare the ratios.
set -euo pipefail

N=${1:-50}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
REF_DIR=${REF_DIR:-/usr/lib/cni}
[ "$(id -u)" = 0 ] || { echo "cni.sh: run as root" >&2; exit 1; }
for b in bridge host-local; do
  [ -x "$REF_DIR/$b" ] || { echo "cni.sh: reference plugin $REF_DIR/$b missing (apt-get install containernetworking-plugins)" >&2; exit 1; }
done

# OURS_DIR=<dir> measures plugins built elsewhere (e.g. installed in /opt/cni/bin) instead of
# building them.
if [ -z "${OURS_DIR:-}" ]; then
  echo "building release binaries..." >&2
  (cd "$ROOT" && cargo build --release -q -p deckhand-cni --bin deckhand-bridge --bin deckhand-host-local)
  TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  OURS_DIR=${TARGET_DIR:-$ROOT/target}/release
fi
for b in deckhand-bridge deckhand-host-local; do
  [ -x "$OURS_DIR/$b" ] || { echo "cni.sh: $OURS_DIR/$b missing" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/dh-bench.XXXXXX)
BR_OURS=dh-bench-br0
BR_REF=dh-bench-br1
NS_PREFIX=dh-bench-$$-

conf() { # impl masq
  local type ipam bridge subnet
  if [ "$1" = ours ]; then
    type=deckhand-bridge ipam=deckhand-host-local bridge=$BR_OURS subnet=10.201.0.0/16
  else
    type=bridge ipam=host-local bridge=$BR_REF subnet=10.202.0.0/16
  fi
  printf '{"cniVersion":"1.0.0","name":"dh-bench-%s","type":"%s","bridge":"%s","isGateway":true,"ipMasq":%s,"hairpinMode":true,"ipam":{"type":"%s","ranges":[[{"subnet":"%s"}]],"dataDir":"%s/ipam-%s"}}' \
    "$1" "$type" "$bridge" "$2" "$ipam" "$subnet" "$WORK" "$1"
}

# The configurations, written once: a call's stdin is a file, so the measurement holds the
# plugin's exec and run and no extra process of the shell's.
for impl in ours ref; do
  for masq in false true; do conf "$impl" "$masq" >"$WORK/conf-$impl-$masq"; done
done

# cni IMPL CMD NS MASQ: one plugin call; fails loudly.
cni() {
  local bin path ifname
  if [ "$1" = ours ]; then
    bin=$OURS_DIR/deckhand-bridge path=$OURS_DIR ifname=eth0
  else
    bin=$REF_DIR/bridge path=$REF_DIR ifname=eth1
  fi
  CNI_COMMAND=$2 CNI_CONTAINERID="dhbench$3" CNI_NETNS="/run/netns/$NS_PREFIX$3" \
    CNI_IFNAME="$ifname" CNI_PATH=$path "$bin" <"$WORK/conf-$1-$4" >"$WORK/out" 2>"$WORK/err" || {
    echo "cni.sh: $1 $2 $3 failed: $(cat "$WORK/out" "$WORK/err")" >&2
    return 1
  }
}

cleanup() {
  set +e
  for impl in ours ref; do
    for masq in false true; do
      for i in $(seq 1 "$N"); do
        [ -e "/run/netns/$NS_PREFIX$i" ] && cni "$impl" DEL "$i" "$masq" 2>/dev/null
      done
    done
  done
  for i in $(seq 1 "$N"); do ip link del "dhfl$i" 2>/dev/null; ip netns del "$NS_PREFIX$i" 2>/dev/null; done
  ip link del $BR_OURS 2>/dev/null
  ip link del $BR_REF 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

for i in $(seq 1 "$N"); do ip netns add "$NS_PREFIX$i"; done

# batch IMPL MASQ: ADD in every namespace, then DEL in every namespace. Per-call microseconds are
# appended to $WORK/IMPL-CMD-MASQ, each batch's wall time to ….batch. The clock is read with
# $EPOCHREALTIME (no subshell: forking one would be timed with the call).
batch() {
  local t0 t1 start end cmd i
  for cmd in ADD DEL; do
    start=${EPOCHREALTIME/./}
    for ((i = 1; i <= N; i++)); do
      t0=${EPOCHREALTIME/./}
      cni "$1" "$cmd" "$i" "$2"
      t1=${EPOCHREALTIME/./}
      echo $((t1 - t0)) >>"$WORK/$1-$cmd-$2"
    done
    end=${EPOCHREALTIME/./}
    echo $((end - start)) >>"$WORK/$1-$cmd-$2.batch"
  done
}

# Warm-up (page cache, first bridge creation) outside the measurement.
for impl in ours ref; do cni $impl ADD 1 false; cni $impl DEL 1 false; done

# Two rounds in ABBA order, so slow drifts in the machine's load hit both sides alike.
for masq in false true; do
  echo "running ipMasq=$masq..." >&2
  batch ours "$masq"
  batch ref "$masq"
  batch ref "$masq"
  batch ours "$masq"
done

# The kernel's floor for DEL: the same veth pair (host end up on our bridge, eth9 up inside the
# netns), deleted by one `ip` process, timed like a plugin call: what any DEL pays here, plugin
# or not. Not a plugin, so it has no ratio of its own; floor/ref is the lowest DEL ratio possible.
echo "running the veth-delete floor..." >&2
ip link set "$BR_OURS" up 2>/dev/null || true
for ((i = 1; i <= N; i++)); do
  ip link add "dhfl$i" type veth peer name eth9 netns "$NS_PREFIX$i"
  ip link set "dhfl$i" master "$BR_OURS" up
  ip -n "$NS_PREFIX$i" link set eth9 up
done
for ((i = 1; i <= N; i++)); do
  t0=${EPOCHREALTIME/./}
  ip -n "$NS_PREFIX$i" link del eth9
  t1=${EPOCHREALTIME/./}
  echo $((t1 - t0)) >>"$WORK/floor-DEL"
done

stat() { # file -> "median p99" in ms
  sort -n "$1" | awk '{a[NR]=$1} END {
    m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2;
    p = int(NR * 0.99 + 0.999); if (p > NR) p = NR; if (p < 1) p = 1;
    printf "%.2f %.2f", m / 1000, a[p] / 1000 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }

printf '\n%s network namespaces, ADD then DEL each (bridge + host-local, isGateway, hairpinMode);\ntwo batches per side in ABBA order; med/p99 over all %s calls per side, "batch" = mean batch wall time\n\n' "$N" "$((2 * N))"
printf '%-8s %-4s | %9s %9s %10s | %9s %9s %10s | %8s %8s %8s\n' \
  ipMasq op "ours med" "ours p99" "ours batch" "ref med" "ref p99" "ref batch" "med" "p99" "batch"
printf '%-8s %-4s | %9s %9s %10s | %9s %9s %10s | %8s %8s %8s\n' "" "" ms ms s ms ms s ours/ref ours/ref ours/ref
for masq in false true; do
  for op in ADD DEL; do
    read -r om op99 <<<"$(stat "$WORK/ours-$op-$masq")"
    read -r rm rp99 <<<"$(stat "$WORK/ref-$op-$masq")"
    ob=$(awk '{s += $1} END {printf "%.3f", s / NR / 1e6}' "$WORK/ours-$op-$masq.batch")
    rb=$(awk '{s += $1} END {printf "%.3f", s / NR / 1e6}' "$WORK/ref-$op-$masq.batch")
    printf '%-8s %-4s | %9s %9s %10s | %9s %9s %10s | %8s %8s %8s\n' "$masq" "$op" \
      "$om" "$op99" "$ob" "$rm" "$rp99" "$rb" "$(ratio "$om" "$rm")" "$(ratio "$op99" "$rp99")" "$(ratio "$ob" "$rb")"
  done
done
read -r fm fp99 <<<"$(stat "$WORK/floor-DEL")"
read -r rm rp99 <<<"$(stat "$WORK/ref-DEL-false")"
printf '\nfloor: `ip link del` of the same veth pair, %s times: median %s ms, p99 %s ms; floor/ref DEL (ipMasq=false) %s\n' \
  "$N" "$fm" "$fp99" "$(ratio "$fm" "$rm")"
