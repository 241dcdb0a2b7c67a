#!/usr/bin/env bash
# Benchmarks pod start and teardown through CRI: deckhand-cri against containerd 1.6's CRI plugin,
# in the same run, with the same client (dh-cri-bench, release build), the same images from the
# test bed's registry and the same CNI conflist (the reference bridge + host-local + portmap from
# /usr/lib/cni on the bridge dhbench0, 10.99.0.0/24, ipMasq; addresses stay inside the pods'
# namespaces and the bridge).
#
# The client does what the kubelet does: ImageStatus/PullImage outside the timing, then per pod
# RunPodSandbox (metadata, hostname, log directory, cgroupfs cgroup_parent /dhbench/pod<uid>, no
# port mappings) + CreateContainer (dh/busybox, `sleep 3600`, a log path) + StartContainer
# ("start"), and StopPodSandbox + RemovePodSandbox ("stop"). Per runtime: one untimed warm-up pod,
# then N pods one after another (seq: N starts, then N stops), then N pods at once (par: N starts
# in flight, then N stops in flight); runtimes interleaved (seq: containerd first, par: deckhand
# first). Memory: N running pods per runtime; RSS and PSS (/proc/PID/smaps_rollup) summed over the
# daemon and every process it keeps per pod (containerd + containerd-shim-runc-v2 + pause;
# deckhand-cri + deckhand-monitor + whatever else it starts), without the containers' own
# `sleep` processes. Prints medians, p99, totals, memory and the ratios deckhand/containerd;
# then the conflist's plugins alone, without a runtime (the part of every start and stop that
# neither runtime can make faster), against containerd's start and stop.
#
# It starts its own containerd (root, state, socket, config under /tmp/dh-bench-cri.*, CRI plugin
# with restrict_oom_score_adj = true, the registry as plain HTTP through certs.d/hosts.toml, the
# test bed's sandbox image dh/pause:latest: busybox's `sleep`) and its own deckhand-cri (release).
# deckhand-cri is measured only if it serves the RuntimeService (Version/Status through
# dh-cri-bench); otherwise the script says so and measures containerd alone. Everything it creates is named dh* and removed on exit,
# also when interrupted: pods, the bridge, iptables rules, cgroups, mounts, the daemons (by PID).
#
#   hack/testbed.sh up; hack/bench/cri.sh [N]     (default 30; needs the test bed's registry)
#   DH_CRI_RUNTIME_FLAGS="--foo x" hack/bench/cri.sh   extra deckhand-cri flags (see below)
#   DH_BENCH_LOG=debug hack/bench/cri.sh 5             daemon logs kept in /tmp/dh-bench-cri-*.log
#   DH_BENCH_SMAPS=DIR hack/bench/cri.sh               /proc/PID/smaps of every measured process
#                                                      copied to DIR/SIDE-COMM-PID at the measurement
set -euo pipefail

N=${1:-30}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/hack/lib/common.sh"
[ "$(id -u)" = 0 ] || { echo "cri.sh: run as root" >&2; exit 1; }
ENV_FILE=${DH_TESTBED_ENV:-/tmp/dh-testbed/testbed.env}
[ -f "$ENV_FILE" ] || { echo "cri.sh: no test bed ($ENV_FILE); start it with hack/testbed.sh up" >&2; exit 1; }
# shellcheck disable=SC1090
. "$ENV_FILE"
REG=${DH_REGISTRY:?}
CNI_BIN=${CNI_BIN:-/usr/lib/cni}
SUBNET=${SUBNET:-10.99.0.0/24}
BRIDGE=dhbench0
FLOOR_BRIDGE=dhbench1
FLOOR_SUBNET=10.99.1.0/24
NET_NAME=dh-bench-cri
CGROUP_PARENT=/dhbench
IMAGE=$REG/dh/busybox:latest
PAUSE_IMAGE=$REG/dh/pause:latest
WORKLOAD="sleep 3600"
for t in containerd containerd-shim-runc-v2 runc ip iptables-save; do
  command -v "$t" >/dev/null || { echo "cri.sh: $t missing (hack/install-deps.sh)" >&2; exit 1; }
done
for p in bridge host-local portmap loopback; do
  [ -x "$CNI_BIN/$p" ] || { echo "cri.sh: CNI plugin $CNI_BIN/$p missing" >&2; exit 1; }
done
if ip link show "$BRIDGE" >/dev/null 2>&1; then
  echo "cri.sh: $BRIDGE exists (another run, or a crashed one: ip link del $BRIDGE)" >&2; exit 1
fi

echo "building release binaries..." >&2
(cd "$ROOT" && cargo build --release -q -p deckhand-tests --bin dh-cri-bench &&
  cargo build --release -q -p deckhand-cri --bin deckhand-cri --bin deckhand-monitor --bin deckhand-runc)
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
BIN=${TARGET_DIR:-$ROOT/target}/release
BENCH=$BIN/dh-cri-bench

WORK=$(mktemp -d /tmp/dh-bench-cri.XXXXXX)
C=$WORK/containerd
D=$WORK/deckhand
CTR_SOCK=$C/containerd.sock
DH_SOCK=$D/cri.sock
HOLD_PID=
HAVE_DH=0
mkdir -p "$C/cni/net.d" "$C/certs.d/$REG" "$C/logs" "$D/cni/net.d" "$D/logs"

# ---- deckhand-cri's RuntimeService flags ---------------------------------------------------------
# >>> When the RuntimeService lands, check cri-shim/src/bin/deckhand-cri.rs and make this match its
# flags (CNI conf and bin dirs, pod log root, sandbox image, ...). Flags whose name is listed here
# are passed if `deckhand-cri --help` mentions them; DH_CRI_RUNTIME_FLAGS adds any others verbatim.
DH_CRI_CANDIDATE_FLAGS=(
  "--cni-conf-dir=$D/cni/net.d"
  "--cni-bin-dir=$CNI_BIN"
  "--streaming-addr=127.0.0.1:0"
)
# shellcheck disable=SC2206
DH_CRI_EXTRA_FLAGS=(${DH_CRI_RUNTIME_FLAGS:-})
# <<<

cleanup() {
  set +e
  trap - EXIT INT TERM
  if [ -n "$HOLD_PID" ] && kill -0 "$HOLD_PID" 2>/dev/null; then
    kill -TERM "$HOLD_PID" 2>/dev/null   # dh-cri-bench tears its pods down on the first signal
    for _ in $(seq 1 1200); do kill -0 "$HOLD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$HOLD_PID" 2>/dev/null
  fi
  exec 3>&-
  # Pods of any run of dh-cri-bench that are still there (an error, an interrupted run).
  dh_alive "$WORK" containerd && "$BENCH" --endpoint "$CTR_SOCK" --mode clean --log-root "$C/logs" >/dev/null
  dh_alive "$WORK" deckhand-cri && [ "$HAVE_DH" = 1 ] &&
    "$BENCH" --endpoint "$DH_SOCK" --mode clean --log-root "$D/logs" >/dev/null
  (dh_stop "$WORK" deckhand-cri containerd) 2>/dev/null
  # Processes the daemons left (shims, monitors, containers): only those naming our directory.
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -qF -- "$WORK/"; then
      kill -KILL "${p#/proc/}" 2>/dev/null
    fi
  done
  # Containers whose shim or monitor is gone: whatever is still in our pods' cgroups.
  for m in $(awk '$9 == "cgroup" || $9 == "cgroup2" {print $5}' /proc/self/mountinfo); do
    [ -d "$m$CGROUP_PARENT" ] || continue
    find "$m$CGROUP_PARENT" -name cgroup.procs -exec cat {} + 2>/dev/null | while read -r pid; do
      kill -KILL "$pid" 2>/dev/null
    done
  done
  sleep 0.2
  awk -v w="$WORK/" 'index($5, w) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null
  done
  iptables_cleanup
  rm -f /var/lib/cni/results/"$NET_NAME"-* 2>/dev/null
  ip link del "$BRIDGE" 2>/dev/null
  ip link del "$FLOOR_BRIDGE" 2>/dev/null
  for n in /run/netns/dhbench-cni-$$-*; do [ -e "$n" ] && ip netns del "${n##*/}" 2>/dev/null; done
  for m in $(awk '$9 == "cgroup" || $9 == "cgroup2" {print $5}' /proc/self/mountinfo); do
    [ -d "$m$CGROUP_PARENT" ] && find "$m$CGROUP_PARENT" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  if [ -n "${DH_BENCH_LOG:-}" ]; then
    cp "$WORK/logs/containerd.log" /tmp/dh-bench-cri-containerd.log 2>/dev/null
    cp "$WORK/logs/deckhand-cri.log" /tmp/dh-bench-cri-deckhand.log 2>/dev/null
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Rules a plugin left when a DEL did not run: those whose comment names our network.
iptables_cleanup() {
  local table line chains c
  for table in nat filter; do
    chains=$(iptables-save -t "$table" 2>/dev/null | grep -F "$NET_NAME" |
      sed -n 's/^-A \([^ ]*\) .*/\1/p; s/.* -j \(CNI-[^ ]*\).*/\1/p' | grep '^CNI-' | sort -u)
    iptables-save -t "$table" 2>/dev/null | grep -F "$NET_NAME" | grep '^-A ' | while read -r line; do
      eval "iptables -w -t $table -D ${line#-A }" 2>/dev/null
    done
    for c in $chains; do
      iptables -w -t "$table" -F "$c" 2>/dev/null
      iptables -w -t "$table" -X "$c" 2>/dev/null
    done
  done
}

# ---- CNI: one conflist, one host-local data dir per runtime --------------------------------------
conflist() { # DATADIR
  cat <<JSON
{"cniVersion":"1.0.0","name":"$NET_NAME","plugins":[
  {"type":"bridge","bridge":"$BRIDGE","isGateway":true,"ipMasq":true,"hairpinMode":true,
   "ipam":{"type":"host-local","ranges":[[{"subnet":"$SUBNET"}]],"routes":[{"dst":"0.0.0.0/0"}],"dataDir":"$1"}},
  {"type":"portmap","capabilities":{"portMappings":true}}]}
JSON
}
conflist "$C/ipam" >"$C/cni/net.d/10-dhbench.conflist"
conflist "$D/ipam" >"$D/cni/net.d/10-dhbench.conflist"

# ---- containerd -----------------------------------------------------------------------------------
cat >"$C/certs.d/$REG/hosts.toml" <<TOML
server = "http://$REG"
[host."http://$REG"]
  capabilities = ["pull", "resolve"]
TOML
cat >"$C/config.toml" <<TOML
version = 2
root = "$C/root"
state = "$C/state"
oom_score = 0
[grpc]
  address = "$CTR_SOCK"
[debug]
  level = "${DH_BENCH_LOG:-warn}"
[plugins."io.containerd.internal.v1.opt"]
  path = "$C/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # Root here lacks CAP_SYS_RESOURCE: negative oom_score_adj values must be clamped.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_cdi = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$C/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$C/certs.d"
TOML
dh_start "$WORK" containerd containerd --config "$C/config.toml"
# cri_ready SOCK: Version and Status answer, RuntimeReady and NetworkReady (the CNI config loaded).
cri_ready() { "$BENCH" --endpoint "$1" --mode probe 2>/dev/null | grep -q 'runtime_ready=true network_ready=true'; }
dh_wait "$WORK" containerd 30 "a ready CRI" cri_ready "$CTR_SOCK"
CTR_PID=$(dh_pid "$WORK" containerd)

# ---- deckhand-cri -----------------------------------------------------------------------------------
# A plain-HTTP registry on loopback needs no entry; it is written out to be explicit.
printf '[hosts."%s"]\nplain_http = true\n' "$REG" >"$D/registries.toml"
dh_flags=(--config /dev/null --socket "$DH_SOCK" --root "$D/root" --state-dir "$D/state"
  --registry-config "$D/registries.toml" --log-level "${DH_BENCH_LOG:-warn}")
help=$("$BIN/deckhand-cri" --help 2>&1 || true)
for f in "${DH_CRI_CANDIDATE_FLAGS[@]}"; do
  grep -qF -- "${f%%=*}" <<<"$help" && dh_flags+=("$f")
done
dh_flags+=("${DH_CRI_EXTRA_FLAGS[@]}")
dh_start "$WORK" deckhand-cri "$BIN/deckhand-cri" "${dh_flags[@]}"
dh_wait "$WORK" deckhand-cri 30 "its socket" test -S "$DH_SOCK"
set +e
probe=$("$BENCH" --endpoint "$DH_SOCK" --mode probe 2>&1)
rc=$?
set -e
case "$rc" in
0) HAVE_DH=1
   dh_wait "$WORK" deckhand-cri 30 "RuntimeReady and NetworkReady ($probe)" cri_ready "$DH_SOCK"
   echo "deckhand-cri: $("$BENCH" --endpoint "$DH_SOCK" --mode probe)" >&2 ;;
3) echo "deckhand-cri has no RuntimeService yet ($probe): measuring containerd alone" >&2
   dh_stop "$WORK" deckhand-cri ;;
*) echo "cri.sh: probing deckhand-cri failed: $probe" >&2; exit 1 ;;
esac
DH_PID=
[ "$HAVE_DH" = 1 ] && DH_PID=$(dh_pid "$WORK" deckhand-cri)

# ---- runs -------------------------------------------------------------------------------------------
# bench RT MODE OUT [ARGS...]: one dh-cri-bench run against runtime RT (ctr|dh).
bench() {
  local rt=$1 mode=$2 out=$3; shift 3
  local sock=$CTR_SOCK logs=$C/logs extra=(--pull "$PAUSE_IMAGE")
  [ "$rt" = dh ] && sock=$DH_SOCK logs=$D/logs extra=()
  "$BENCH" --endpoint "$sock" --image "$IMAGE" --pods "$N" --mode "$mode" --log-root "$logs" \
    --cgroup-parent "$CGROUP_PARENT" --command "$WORKLOAD" "${extra[@]}" "$@" >"$out" 2>"$out.err" || {
    echo "cri.sh: $rt $mode failed: $(tail -5 "$out.err")" >&2; return 1; }
}

RUNTIMES=(ctr); [ "$HAVE_DH" = 1 ] && RUNTIMES=(ctr dh)
for rt in "${RUNTIMES[@]}"; do echo "seq: $rt..." >&2; bench "$rt" seq "$WORK/$rt.seq"; done
for ((i = ${#RUNTIMES[@]} - 1; i >= 0; i--)); do
  rt=${RUNTIMES[i]}; echo "par: $rt..." >&2; bench "$rt" par "$WORK/$rt.par"
done

# mem MARKER DAEMON_PID -> "rss_kib pss_kib" of the daemon, every process whose command line names
# MARKER, and all their descendants, less the containers' workload processes and the client.
mem() {
  local marker=$1 daemon=$2 p pid cmd rest
  declare -A parent=() keep=()
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    rest=$(cat "$p/stat" 2>/dev/null) || continue
    rest=${rest##*) }
    read -r _ ppid _ <<<"$rest"
    parent[$pid]=$ppid
    cmd=$( { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null) || continue
    case "$cmd" in *"$marker"*) keep[$pid]=1 ;; esac
  done
  keep[$daemon]=1
  local changed=1
  while [ "$changed" = 1 ]; do
    changed=0
    for pid in "${!parent[@]}"; do
      if [ -z "${keep[$pid]:-}" ] && [ -n "${keep[${parent[$pid]}]:-}" ]; then keep[$pid]=1; changed=1; fi
    done
  done
  unset "keep[$HOLD_PID]"
  local rss=0 pss=0 r s names=
  for pid in "${!keep[@]}"; do
    cmd=$( { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null) || continue
    [ "$cmd" = "$WORKLOAD " ] && continue
    read -r r s <<<"$(awk '/^Rss:/ {r=$2} /^Pss:/ {p=$2} END {print r+0, p+0}' "/proc/$pid/smaps_rollup" 2>/dev/null)"
    rss=$((rss + ${r:-0})); pss=$((pss + ${s:-0}))
    if [ -n "${DH_BENCH_SMAPS:-}" ]; then
      mkdir -p "$DH_BENCH_SMAPS"
      cp "/proc/$pid/smaps" "$DH_BENCH_SMAPS/$rt-$(cat "/proc/$pid/comm" 2>/dev/null)-$pid" 2>/dev/null || true
    fi
    names="$names$(cat "/proc/$pid/comm" 2>/dev/null)"$'\n'
  done
  echo "$rss $pss"
  # What was counted, for the record: "containerd x1, containerd-shim x30, ...".
  printf '%s' "$names" | grep . | sort | uniq -c | awk '{printf "%s%s x%s", (NR>1 ? ", " : ""), $2, $1} END {print ""}' >&2
}

hold() { # RT -> memory figures in $WORK/RT.mem
  local rt=$1 marker=$C/ daemon=$CTR_PID
  [ "$rt" = dh ] && marker=$D/ daemon=$DH_PID
  rm -f "$WORK/hold.fifo"; mkfifo "$WORK/hold.fifo"
  local sock=$CTR_SOCK logs=$C/logs extra=(--pull "$PAUSE_IMAGE")
  [ "$rt" = dh ] && sock=$DH_SOCK logs=$D/logs extra=()
  "$BENCH" --endpoint "$sock" --image "$IMAGE" --pods "$N" --mode hold --log-root "$logs" \
    --cgroup-parent "$CGROUP_PARENT" --command "$WORKLOAD" "${extra[@]}" \
    <"$WORK/hold.fifo" >"$WORK/$rt.hold" 2>"$WORK/$rt.hold.err" &
  HOLD_PID=$!
  exec 3<>"$WORK/hold.fifo"
  for _ in $(seq 1 3000); do
    grep -q '^ready ' "$WORK/$rt.hold" 2>/dev/null && break
    kill -0 "$HOLD_PID" 2>/dev/null || { echo "cri.sh: $rt hold failed: $(tail -5 "$WORK/$rt.hold.err")" >&2; return 1; }
    sleep 0.1
  done
  grep -q '^ready ' "$WORK/$rt.hold" || { echo "cri.sh: $rt hold: pods not up after 300 s" >&2; return 1; }
  sleep 2 # let the shims and monitors settle
  echo -n "memory with $N pods, $rt: " >&2
  mem "$marker" "$daemon" >"$WORK/$rt.mem"
  echo >&3; exec 3>&-
  wait "$HOLD_PID" || { echo "cri.sh: $rt hold teardown failed: $(tail -5 "$WORK/$rt.hold.err")" >&2; HOLD_PID=; return 1; }
  HOLD_PID=
}
for rt in "${RUNTIMES[@]}"; do echo "memory: $rt..." >&2; hold "$rt"; done

# ---- the conflist alone ---------------------------------------------------------------------------
# The same plugins with the same settings (own bridge, subnet and data dir), called the way a
# runtime calls them (bridge, then portmap with the bridge's result; DEL in reverse), in N fresh
# network namespaces one after another, with no runtime at all. Every pod start and stop above
# includes this work, so (CNI ADD) / (containerd's start) is the lowest start ratio these
# plugins allow. The clock is $EPOCHREALTIME (no process of the shell's is timed).
echo "the conflist alone..." >&2
FLOOR_NS=dhbench-cni-$$-
cni_floor() { # PLUGIN CMD I STDIN
  CNI_COMMAND=$2 CNI_CONTAINERID=dhbenchfloor$3 CNI_NETNS=/run/netns/$FLOOR_NS$3 CNI_IFNAME=eth0 \
    CNI_PATH=$CNI_BIN "$CNI_BIN/$1" <"$4" >"$WORK/floor.out" 2>&1 || {
    echo "cri.sh: $1 $2 failed: $(cat "$WORK/floor.out")" >&2; return 1; }
}
cat >"$WORK/floor-bridge.json" <<JSON
{"cniVersion":"1.0.0","name":"$NET_NAME-floor","type":"bridge","bridge":"$FLOOR_BRIDGE","isGateway":true,"ipMasq":true,"hairpinMode":true,
 "ipam":{"type":"host-local","ranges":[[{"subnet":"$FLOOR_SUBNET"}]],"routes":[{"dst":"0.0.0.0/0"}],"dataDir":"$WORK/floor-ipam"}}
JSON
PORTMAP_CONF='{"cniVersion":"1.0.0","name":"'$NET_NAME'-floor","type":"portmap","capabilities":{"portMappings":true},"runtimeConfig":{"portMappings":[]}'
for ((i = 0; i <= N; i++)); do ip netns add "$FLOOR_NS$i"; done
for ((i = 0; i <= N; i++)); do # 0: warm-up
  t0=${EPOCHREALTIME/./}
  cni_floor bridge ADD "$i" "$WORK/floor-bridge.json"
  IFS= read -r -d '' res <"$WORK/floor.out" || true # a builtin: no fork in the timing
  printf '%s,"prevResult":%s}' "$PORTMAP_CONF" "$res" >"$WORK/floor-portmap.json"
  cni_floor portmap ADD "$i" "$WORK/floor-portmap.json"
  t1=${EPOCHREALTIME/./}
  [ "$i" = 0 ] || echo $((t1 - t0)) >>"$WORK/floor.add"
done
printf '%s}' "$PORTMAP_CONF" >"$WORK/floor-portmap-del.json"
for ((i = 0; i <= N; i++)); do
  t0=${EPOCHREALTIME/./}
  cni_floor portmap DEL "$i" "$WORK/floor-portmap-del.json"
  cni_floor bridge DEL "$i" "$WORK/floor-bridge.json"
  t1=${EPOCHREALTIME/./}
  [ "$i" = 0 ] || echo $((t1 - t0)) >>"$WORK/floor.del"
  ip netns del "$FLOOR_NS$i"
done
median_ms() { sort -n "$1" | awk '{a[NR]=$1} END { m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; printf "%.2f", m / 1000 }'; }

# ---- report -----------------------------------------------------------------------------------------
# get FILE KEY FIELD: FIELD (median_ms, p99_ms, ...) of the line KEY; FIELD "" for `KEY value`.
get() {
  [ -f "$1" ] || { echo -; return; }
  awk -v k="$2" -v f="$3" '$1 == k { if (f == "") { print $2; exit }
    for (i = 2; i <= NF; i++) { split($i, a, "="); if (a[1] == f) { print a[2]; exit } } }' "$1"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "-" && b + 0 > 0) printf "%.3fx", a / b; else print "-" }'; }
name_ver() { get "$1" runtime name; }

echo
printf 'CRI pod start (RunPodSandbox+CreateContainer+StartContainer) and stop (StopPodSandbox+RemovePodSandbox),\n'
printf 'N=%s pods, image %s, CNI bridge+host-local+portmap (reference plugins); ms, total in s\n\n' "$N" "$IMAGE"
printf '%-10s | %9s %9s %9s | %9s %9s %9s | %9s %9s %9s\n' "" "ctr med" "ctr p99" "ctr tot" "dh med" "dh p99" "dh tot" "med" "p99" "tot"
printf '%-10s | %29s | %29s | %29s\n' "" "containerd $(get "$WORK/ctr.seq" runtime version)" "deckhand-cri" "deckhand/containerd"
for mode in seq par; do
  for ph in start stop; do
    cm=$(get "$WORK/ctr.$mode" "$ph.pod" median_ms); cp=$(get "$WORK/ctr.$mode" "$ph.pod" p99_ms)
    ct=$(get "$WORK/ctr.$mode" "$ph.total_s" "")
    dm=$(get "$WORK/dh.$mode" "$ph.pod" median_ms); dp=$(get "$WORK/dh.$mode" "$ph.pod" p99_ms)
    dt=$(get "$WORK/dh.$mode" "$ph.total_s" "")
    printf '%-10s | %9s %9s %9s | %9s %9s %9s | %9s %9s %9s\n' "$mode $ph" "$cm" "$cp" "$ct" \
      "${dm:--}" "${dp:--}" "${dt:--}" "$(ratio "${dm:--}" "$cm")" "$(ratio "${dp:--}" "$cp")" "$(ratio "${dt:--}" "$ct")"
  done
done
echo
printf 'per RPC, median ms (seq | par):\n'
for rpc in RunPodSandbox CreateContainer StartContainer StopPodSandbox RemovePodSandbox; do
  ph=start; case $rpc in Stop* | Remove*) ph=stop ;; esac
  printf '  %-17s containerd %8s | %8s    deckhand-cri %8s | %8s\n' "$rpc" \
    "$(get "$WORK/ctr.seq" "$ph.$rpc" median_ms)" "$(get "$WORK/ctr.par" "$ph.$rpc" median_ms)" \
    "$(get "$WORK/dh.seq" "$ph.$rpc" median_ms | sed 's/^$/-/')" "$(get "$WORK/dh.par" "$ph.$rpc" median_ms | sed 's/^$/-/')"
done
echo
read -r crss cpss <"$WORK/ctr.mem"
drss=- dpss=-
[ -f "$WORK/dh.mem" ] && read -r drss dpss <"$WORK/dh.mem"
mib() { awk -v k="$1" 'BEGIN { if (k == "-") print "-"; else printf "%.1f", k / 1024 }'; }
printf 'memory with %s running pods (daemon + per-pod processes, without the containers), MiB:\n' "$N"
printf '  %-28s RSS %8s   PSS %8s\n' "containerd + shims + pause" "$(mib "$crss")" "$(mib "$cpss")"
printf '  %-28s RSS %8s   PSS %8s\n' "deckhand-cri + monitors" "$(mib "$drss")" "$(mib "$dpss")"
printf '  %-28s RSS %8s   PSS %8s\n' "deckhand/containerd" "$(ratio "$drss" "$crss")" "$(ratio "$dpss" "$cpss")"
fa=$(median_ms "$WORK/floor.add"); fd=$(median_ms "$WORK/floor.del")
printf '\nthe conflist alone (bridge+host-local, portmap; no runtime), %s times, median ms:\n' "$N"
printf '  ADD %8s   = %s of containerd'"'"'s seq start median: the lowest start ratio these plugins allow\n' \
  "$fa" "$(ratio "$fa" "$(get "$WORK/ctr.seq" start.pod median_ms)")"
printf '  DEL %8s   = %s of containerd'"'"'s seq stop median\n' \
  "$fd" "$(ratio "$fd" "$(get "$WORK/ctr.seq" stop.pod median_ms)")"
[ "$HAVE_DH" = 1 ] || printf '\ndeckhand-cri has no RuntimeService yet: containerd alone was measured.\n'
