#!/usr/bin/env bash
# Benchmarks the whole node through the API server: Deckhand (deckhand-kubelet + deckhand-cri with
# the built-in runtime + deckhand-bridge/deckhand-host-local) against upstream (the kubelet 1.20 of
# hack/build-kube.sh + containerd 1.6 from Debian with its CRI plugin + runc + the reference bridge
# and host-local from /usr/lib/cni), in the same run, registered with the test bed's kube-apiserver
# as the nodes dhbench-dh and dhbench-up.
#
# Pods: busybox from the test bed's registry (`sh -c "trap 'exit 0' TERM; sleep 3600 & wait"`, so
# that SIGTERM ends it at once and deletion is not the grace period), spec.nodeName set, pod network
# (dhbench-dh: bridge dh-kbdh0 10.98.1.0/24; dhbench-up: bridge dh-kbup0 10.98.2.0/24; no ipMasq,
# no portmap, so no iptables rules), no service-account token, in the namespace dhbench-kubelet-*.
# One watch on that namespace (curl, each event stamped on arrival by perl) is the clock for both
# sides: start latency = ADDED seen -> Ready=True seen; deletion = deletionTimestamp seen -> DELETED
# seen. Per side: one untimed warm-up pod (the image pull), then N pods one after another (seq),
# then M at once (par); sides interleaved (seq: upstream first, par: deckhand first). With the M
# par pods running and settled: memory, RSS and PSS (/proc/PID/smaps_rollup) summed over the
# kubelet, the runtime daemon and every process it keeps per pod (containerd-shim-runc-v2 + pause;
# deckhand-monitor), without the containers' own processes; and idle CPU, the same processes'
# utime+stime (with their reaped children's) over IDLE seconds, as % of one core. Prints medians,
# p99 and the ratios deckhand/upstream.
#
# The upstream kubelet and its containerd run in a private mount namespace (unshare -m): fake
# /proc/sys files already holding the values the kubelet wants (it writes them otherwise), private
# binds over /var/lib/kubelet and /var/log/pods (fixed paths of the kubelet and of containerd's
# container logs), --cgroup-root /dhbench-up (deckhand-kubelet: cgroupRoot /dhbench-dh). Everything made is named dh* and removed on exit, also
# when interrupted: pods, nodes, the namespace, both kubelets, containerd, deckhand-cri (by PID),
# shims/monitors/containers naming our directory, bridges, mounts, cgroups.
#
#   hack/testbed.sh up; hack/bench/kubelet.sh [N [M]]  (default 20 one at a time, 30 at once)
#   IDLE=60 hack/bench/kubelet.sh                      idle CPU sampled over 60 s (default 30)
#   DH_BENCH_KEEP_LOGS=1 hack/bench/kubelet.sh 5       daemon logs kept in /tmp/dh-bench-kubelet-logs
#   DH_BENCH_SMAPS=DIR hack/bench/kubelet.sh           /proc/PID/smaps of every measured process
#                                                      copied to DIR/SIDE-COMM-PID at the measurement
set -euo pipefail

N=${1:-20}
M=${2:-30}
IDLE=${IDLE:-30}
for v in "$N" "$M" "$IDLE"; do
  [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "kubelet.sh: N, M and IDLE must be positive integers" >&2; exit 1; }
done
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/hack/lib/common.sh"
[ "$(id -u)" = 0 ] || { echo "kubelet.sh: run as root" >&2; exit 1; }
ENV_FILE=${DH_TESTBED_ENV:-/tmp/dh-testbed/testbed.env}
[ -f "$ENV_FILE" ] || { echo "kubelet.sh: no test bed ($ENV_FILE); start it with hack/testbed.sh up" >&2; exit 1; }
# shellcheck disable=SC1090
. "$ENV_FILE"
REG=${DH_REGISTRY:?}
TB=${DH_TESTBED_DIR:?}
API=${DH_APISERVER:?}
PKI=${DH_PKI_DIR:?}
KUBECTL=${DH_KUBECTL:?}
UP_KUBELET=${DH_KUBE_BIN:?}/kubelet
CNI_BIN=${CNI_BIN:-/usr/lib/cni}
IMAGE=$REG/dh/busybox:latest
PAUSE_IMAGE=$REG/dh/pause:latest
NODE_DH=dhbench-dh NODE_UP=dhbench-up
BR_DH=dh-kbdh0 BR_UP=dh-kbup0
NET_DH=dh-bench-kubelet-dh NET_UP=dh-bench-kubelet-up
CG_UP=/dhbench-up CG_DH=/dhbench-dh
for t in containerd containerd-shim-runc-v2 runc unshare nsenter curl jq perl ip; do
  command -v "$t" >/dev/null || { echo "kubelet.sh: $t missing (hack/install-deps.sh)" >&2; exit 1; }
done
[ -x "$UP_KUBELET" ] || { echo "kubelet.sh: $UP_KUBELET missing (hack/build-kube.sh)" >&2; exit 1; }
for p in bridge host-local loopback; do
  [ -x "$CNI_BIN/$p" ] || { echo "kubelet.sh: CNI plugin $CNI_BIN/$p missing" >&2; exit 1; }
done
for b in "$BR_DH" "$BR_UP"; do
  ! ip link show "$b" >/dev/null 2>&1 || { echo "kubelet.sh: $b exists (another run? ip link del $b)" >&2; exit 1; }
done
kc=("$KUBECTL" --kubeconfig "$DH_KUBECONFIG")
api() { # METHOD PATH [BODY]: the API server as the admin
  curl -sS --max-time 30 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    -X "$1" -H 'Content-Type: application/json' ${3:+--data "$3"} "${@:4}" "$API$2"
}
for n in "$NODE_DH" "$NODE_UP"; do
  if "${kc[@]}" get node "$n" >/dev/null 2>&1; then
    echo "kubelet.sh: node $n exists (another run? kubectl delete node $n)" >&2; exit 1
  fi
done

echo "building release binaries..." >&2
(cd "$ROOT" && cargo build --release -q -p deckhand-kubelet --bin deckhand-kubelet &&
  cargo build --release -q -p deckhand-cri --bin deckhand-cri --bin deckhand-monitor --bin deckhand-runc --bin deckhand-crictl &&
  cargo build --release -q -p deckhand-cni --bin deckhand-bridge --bin deckhand-host-local --bin deckhand-loopback)
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
BIN=${TARGET_DIR:-$ROOT/target}/release

WORK=$(mktemp -d /tmp/dh-bench-kubelet.XXXXXX)
U=$WORK/up D=$WORK/dh
NS=dhbench-kubelet-${WORK##*.}
NS=$(tr 'A-Z' 'a-z' <<<"$NS")
CTR_SOCK=$U/containerd.sock DH_SOCK=$D/cri.sock
WATCH_PIDS=() MADE_DIRS=() NS_MADE=0
mkdir -p "$U/cni/net.d" "$U/certs.d/$REG" "$U/sys" "$U/varlib" "$U/pod-logs" "$U/node" "$U/kubelet" \
  "$D/cni/net.d" "$D/node" "$D/pod-logs" "$D/kubelet" "$WORK/logs" "$WORK/pids"

# ---- cleanup ---------------------------------------------------------------------------------------
pod_uids() { awk '{print $4}' "$WORK/events" 2>/dev/null | sort -u; }
cleanup() {
  set +e
  trap - EXIT INT TERM
  echo "cleaning up..." >&2
  if [ "$NS_MADE" = 1 ]; then
    # Graceful first, while both kubelets run (they tear the sandboxes down), then forced.
    "${kc[@]}" -n "$NS" delete pods --all --wait=true --timeout=60s >/dev/null 2>&1
    "${kc[@]}" -n "$NS" delete pods --all --grace-period=0 --force >/dev/null 2>&1
  fi
  for p in "${WATCH_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  (dh_stop "$WORK" deckhand-kubelet kubelet) 2>/dev/null
  dh_alive "$WORK" deckhand-cri && "$BIN/deckhand-crictl" -r "unix://$DH_SOCK" rmp --all >/dev/null 2>&1
  (dh_stop "$WORK" deckhand-cri containerd) 2>/dev/null
  "${kc[@]}" delete node "$NODE_DH" "$NODE_UP" --ignore-not-found --wait=false >/dev/null 2>&1
  "${kc[@]}" -n kube-node-lease delete lease "$NODE_DH" "$NODE_UP" --ignore-not-found >/dev/null 2>&1
  [ "$NS_MADE" = 1 ] && "${kc[@]}" delete namespace "$NS" --wait=false >/dev/null 2>&1
  # Processes the daemons left (shims, monitors, pause, containers): those naming our directory.
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -qF -- "$WORK/"; then kill -KILL "${p#/proc/}" 2>/dev/null; fi
  done
  local m uid
  local cgs=()
  for m in $(awk '$9 == "cgroup" || $9 == "cgroup2" {print $5}' /proc/self/mountinfo); do
    [ -d "$m$CG_UP" ] && cgs+=("$m$CG_UP")
    [ -d "$m$CG_DH" ] && cgs+=("$m$CG_DH")
    for uid in $(pod_uids); do
      for d in "$m"/kubepods/pod"$uid" "$m"/kubepods/*/pod"$uid"; do [ -d "$d" ] && cgs+=("$d"); done
    done
  done
  for d in "${cgs[@]}"; do
    find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | while read -r pid; do kill -KILL "$pid" 2>/dev/null; done
  done
  sleep 0.3
  awk -v w="$WORK/" 'index($5, w) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null
  done
  for d in "${cgs[@]}"; do find "$d" -depth -type d -exec rmdir {} + 2>/dev/null; done
  ip link del "$BR_DH" 2>/dev/null
  ip link del "$BR_UP" 2>/dev/null
  rm -rf /var/lib/cni/results/"$NET_DH"-* /var/lib/cni/results/"$NET_UP"-* 2>/dev/null
  for d in "${MADE_DIRS[@]}"; do rmdir "$d" 2>/dev/null; done
  if [ -n "${DH_BENCH_KEEP_LOGS:-}" ]; then
    rm -rf /tmp/dh-bench-kubelet-logs; cp -r "$WORK/logs" /tmp/dh-bench-kubelet-logs 2>/dev/null
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { local p; for p in $(seq "$1" $(($1 + 200))); do dh_port_free "$p" && { echo "$p"; return; }; done; return 1; }

# ---- CNI ---------------------------------------------------------------------------------------------
conflist() { # NAME BRIDGE SUBNET DATADIR BRIDGE-TYPE IPAM-TYPE
  cat <<JSON
{"cniVersion":"1.0.0","name":"$1","plugins":[
  {"type":"$5","bridge":"$2","isGateway":true,"ipMasq":false,
   "ipam":{"type":"$6","ranges":[[{"subnet":"$3"}]],"routes":[{"dst":"0.0.0.0/0"}],"dataDir":"$4"}}]}
JSON
}
conflist "$NET_UP" "$BR_UP" 10.98.2.0/24 "$U/ipam" bridge host-local >"$U/cni/net.d/10-dhbench.conflist"
conflist "$NET_DH" "$BR_DH" 10.98.1.0/24 "$D/ipam" deckhand-bridge deckhand-host-local >"$D/cni/net.d/10-dhbench.conflist"

# ---- upstream: containerd in a private mount namespace ------------------------------------------------
cat >"$U/certs.d/$REG/hosts.toml" <<TOML
server = "http://$REG"
[host."http://$REG"]
  capabilities = ["pull", "resolve"]
TOML
cat >"$U/config.toml" <<TOML
version = 2
root = "$U/root"
state = "$U/state"
oom_score = 0
[grpc]
  address = "$CTR_SOCK"
[debug]
  level = "warn"
[plugins."io.containerd.internal.v1.opt"]
  path = "$U/opt"
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
    conf_dir = "$U/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$U/certs.d"
TOML
# The kubelet's sysctls, already at the values it wants, so it writes none (setupKernelTunables).
sysctls=(vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1
  kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000)
binds=""
for s in "${sysctls[@]}"; do
  f=$U/sys/$(tr / _ <<<"${s%%=*}")
  echo "${s#*=}" >"$f"
  binds="$binds mount --bind $f /proc/sys/${s%%=*} &&"
done
for d in /var/lib/kubelet /var/log/pods; do
  [ -d "$d" ] || { mkdir -p "$d"; MADE_DIRS+=("$d"); }
done
binds="$binds mount --bind $U/varlib /var/lib/kubelet && mount --bind $U/pod-logs /var/log/pods &&"
dh_start "$WORK" containerd unshare -m --propagation private -- \
  bash -c "$binds exec containerd --config $U/config.toml"
dh_wait "$WORK" containerd 30 "its socket" ctr --address "$CTR_SOCK" version
CTR_PID=$(dh_pid "$WORK" containerd)

# ---- deckhand-cri ---------------------------------------------------------------------------------------
printf '[hosts."%s"]\nplain_http = true\n' "$REG" >"$D/registries.toml"
dh_start "$WORK" deckhand-cri "$BIN/deckhand-cri" --config /dev/null --socket "$DH_SOCK" \
  --root "$D/root" --state-dir "$D/state" --registry-config "$D/registries.toml" \
  --cni-conf-dir "$D/cni/net.d" --cni-bin-dir "$BIN" --streaming-addr 127.0.0.1:0 --log-level warn
dh_wait "$WORK" deckhand-cri 30 "its socket" test -S "$DH_SOCK"
DHCRI_PID=$(dh_pid "$WORK" deckhand-cri)

# ---- the kubelets -------------------------------------------------------------------------------------
"$ROOT/hack/testbed/controlplane.sh" node-credentials "$TB" "$NODE_DH" "$D/node" >/dev/null 2>&1
"$ROOT/hack/testbed/controlplane.sh" node-credentials "$TB" "$NODE_UP" "$U/node" >/dev/null 2>&1
PORT_DH=$(free_port 36300); PORT_UP=$(free_port $((PORT_DH + 1)))
cat >"$D/node/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
podLogsDir: $D/pod-logs
address: 127.0.0.1
port: $PORT_DH
tlsCertFile: $D/node/kubelet.crt
tlsPrivateKeyFile: $D/node/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $D/node/ca.crt}
authorization: {mode: Webhook}
cgroupRoot: $CG_DH
YAML
# Each kubelet's cgroup root must exist (cpuset: with the parent's cpus and mems); both kubelets
# make their kubepods hierarchy below it and enforce node allocatable there.
for m in $(awk '$9 == "cgroup" || $9 == "cgroup2" {print $5}' /proc/self/mountinfo); do
  for r in "$CG_UP" "$CG_DH"; do
    mkdir -p "$m$r"
    [ -f "$m/cpuset.cpus" ] && cat "$m/cpuset.cpus" >"$m$r/cpuset.cpus" && cat "$m/cpuset.mems" >"$m$r/cpuset.mems"
  done
done
dh_start "$WORK" deckhand-kubelet "$BIN/deckhand-kubelet" --config "$D/node/kubelet.yaml" \
  --kubeconfig "$D/node/kubeconfig" --hostname-override "$NODE_DH" --node-ip 127.0.0.1 \
  --root-dir "$D/kubelet" --container-runtime-endpoint "unix://$DH_SOCK"

dh_start "$WORK" kubelet nsenter -t "$CTR_PID" -m -- "$UP_KUBELET" \
  --kubeconfig "$U/node/kubeconfig" --root-dir "$U/kubelet" --cert-dir "$U/node/pki" \
  --tls-cert-file "$U/node/kubelet.crt" --tls-private-key-file "$U/node/kubelet.key" \
  --client-ca-file "$U/node/ca.crt" --anonymous-auth=false --authentication-token-webhook \
  --authorization-mode Webhook \
  --container-runtime remote --container-runtime-endpoint "unix://$CTR_SOCK" \
  --image-service-endpoint "unix://$CTR_SOCK" --runtime-request-timeout 5m \
  --hostname-override "$NODE_UP" --node-ip 127.0.0.1 \
  --address 127.0.0.1 --port "$PORT_UP" --read-only-port 0 --healthz-port 0 \
  --fail-swap-on=false --cgroup-driver cgroupfs --cgroup-root "$CG_UP" --cgroups-per-qos=true \
  --enforce-node-allocatable= --protect-kernel-defaults=false --make-iptables-util-chains=false \
  --oom-score-adj 0 --volume-plugin-dir "$U/volume-plugins" --seccomp-profile-root "$U/seccomp" \
  --eviction-hard 'memory.available<100Mi' --v 1

node_ready() {
  "${kc[@]}" get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True
}
dh_wait "$WORK" deckhand-kubelet 90 "node $NODE_DH Ready" node_ready "$NODE_DH"
dh_wait "$WORK" kubelet 120 "node $NODE_UP Ready" node_ready "$NODE_UP"
DHK_PID=$(dh_pid "$WORK" deckhand-kubelet); UPK_PID=$(dh_pid "$WORK" kubelet)
echo "nodes $NODE_DH and $NODE_UP Ready" >&2

# ---- namespace and the watch ---------------------------------------------------------------------------
api POST /api/v1/namespaces "{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{\"name\":\"$NS\"}}" >/dev/null
NS_MADE=1
sa_ready() { api GET "/api/v1/namespaces/$NS/serviceaccounts/default" | grep -q '"secrets"'; }
for _ in $(seq 1 300); do sa_ready && break; sleep 0.2; done
sa_ready || { echo "kubelet.sh: no default service account in $NS" >&2; exit 1; }
# events: "EPOCH TYPE NAME UID READY DELETING" per watch event, stamped as it arrives.
mkfifo "$WORK/watch.fifo"
curl -sSN --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
  "$API/api/v1/namespaces/$NS/pods?watch=1&labelSelector=app%3Ddhbench&timeoutSeconds=7200" >"$WORK/watch.fifo" &
WATCH_PIDS+=($!)
perl -MTime::HiRes=time -e '$| = 1; while (<STDIN>) { my $t = time;
  my ($ty) = /^\{"type":"([A-Z]+)"/; my ($n) = /"name":"([^"]+)"/; my ($u) = /"uid":"([^"]+)"/;
  my $r = /"type":"Ready","status":"True"/ ? 1 : 0; my $d = /"deletionTimestamp"/ ? 1 : 0;
  printf "%.6f %s %s %s %d %d\n", $t, $ty // "?", $n // "?", $u // "?", $r, $d }' \
  <"$WORK/watch.fifo" >"$WORK/events" &
WATCH_PIDS+=($!)
sleep 1

pod_json() { # NAME NODE
  cat <<JSON
{"apiVersion":"v1","kind":"Pod","metadata":{"name":"$1","labels":{"app":"dhbench"}},
 "spec":{"nodeName":"$2","automountServiceAccountToken":false,"terminationGracePeriodSeconds":10,
  "tolerations":[{"operator":"Exists"}],
  "containers":[{"name":"sleep","image":"$IMAGE","imagePullPolicy":"IfNotPresent",
   "command":["sh","-c","trap 'exit 0' TERM; sleep 3600 & wait"]}]}}
JSON
}
create() { api POST "/api/v1/namespaces/$NS/pods" "$(pod_json "$1" "$2")" -o /dev/null -w '%{http_code}' | grep -q '^201$' ||
  { echo "kubelet.sh: creating pod $1 failed" >&2; return 1; }; }
delete() { api DELETE "/api/v1/namespaces/$NS/pods/$1" "" -o /dev/null; }
seen() { # NAME TYPE-PATTERN READY DELETING
  awk -v n="$1" -v t="$2" -v r="$3" -v d="$4" '$3 == n && $2 ~ t && (r == "" || $5 == r) && (d == "" || $6 == d) {f = 1; exit} END {exit !f}' "$WORK/events"
}
wait_all() { # WHAT TYPE READY DELETING NAME...: until the watch saw each
  local what=$1 ty=$2 r=$3 d=$4 n deadline=$((SECONDS + 300)); shift 4
  for n in "$@"; do
    until seen "$n" "$ty" "$r" "$d"; do
      [ "$SECONDS" -lt "$deadline" ] || { echo "kubelet.sh: pod $n: not $what after 300 s" >&2; return 1; }
      dh_alive "$WORK" deckhand-kubelet && dh_alive "$WORK" kubelet || { echo "kubelet.sh: a kubelet died (logs: DH_BENCH_KEEP_LOGS=1)" >&2; return 1; }
      sleep 0.05
    done
  done
}
wait_ready() { wait_all Ready 'ADDED|MODIFIED' 1 "" "$@"; }
wait_gone() { wait_all gone DELETED "" "" "$@"; }

# latencies NAME...: "start_ms delete_ms" per pod from the events.
latencies() {
  local n
  for n in "$@"; do
    awk -v n="$n" '$3 == n {
      if ($2 == "ADDED" && !a) a = $1
      if ($5 == 1 && !r && $2 != "DELETED") r = $1
      if ($6 == 1 && !d) d = $1
      if ($2 == "DELETED") g = $1 }
      END { printf "%.1f %.1f\n", (r - a) * 1000, (g - d) * 1000 }' "$WORK/events"
  done
}

names() { # SIDE MODE COUNT
  local i; for i in $(seq 1 "$3"); do echo "dhb-$1-$2-$i"; done; }
node_of() { [ "$1" = dh ] && echo "$NODE_DH" || echo "$NODE_UP"; }

warmup() { local s=$1 n=dhb-$1-warm; create "$n" "$(node_of "$s")"; wait_ready "$n"; delete "$n"; wait_gone "$n"; }
run_seq() {
  local s=$1 n; mapfile -t ns < <(names "$s" seq "$N")
  for n in "${ns[@]}"; do create "$n" "$(node_of "$s")"; wait_ready "$n"; done
  for n in "${ns[@]}"; do delete "$n"; wait_gone "$n"; done
  latencies "${ns[@]}" >"$WORK/$s.seq"
}
run_par() {
  local s=$1 n pids=(); mapfile -t ns < <(names "$s" par "$M")
  for n in "${ns[@]}"; do create "$n" "$(node_of "$s")" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done
  wait_ready "${ns[@]}"
  sleep 5 # let the shims, monitors and kubelets settle
  local marker=$U/ roots=("$UPK_PID" "$CTR_PID")
  [ "$s" = dh ] && marker=$D/ roots=("$DHK_PID" "$DHCRI_PID")
  echo -n "memory with $M pods, $s: " >&2
  SIDE=$s mem "$marker" "${roots[@]}" >"$WORK/$s.mem"
  echo "idle CPU with $M pods, $s: sampling ${IDLE}s..." >&2
  cpu "$marker" "${roots[@]}" >"$WORK/$s.cpu"
  pids=()
  for n in "${ns[@]}"; do delete "$n" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done
  wait_gone "${ns[@]}"
  latencies "${ns[@]}" >"$WORK/$s.par"
}

# kept MARKER PID...: the PIDs, every process whose command line names MARKER and all their
# descendants, less the containers' own processes (sh -c trap..., sleep 3600); one per line.
kept() {
  local marker=$1 p pid cmd rest; shift
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
  for pid in "$@"; do keep[$pid]=1; done
  local changed=1
  while [ "$changed" = 1 ]; do
    changed=0
    for pid in "${!parent[@]}"; do
      if [ -z "${keep[$pid]:-}" ] && [ -n "${keep[${parent[$pid]}]:-}" ]; then keep[$pid]=1; changed=1; fi
    done
  done
  for pid in "${!keep[@]}"; do
    cmd=$( { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null) || continue
    case "$cmd" in "sh -c trap "* | "sleep 3600 ") continue ;; esac
    echo "$pid"
  done
}

# mem MARKER PID...: "rss_kib pss_kib" summed over `kept`.
mem() {
  local rss=0 pss=0 r s names= pid
  for pid in $(kept "$@"); do
    read -r r s <<<"$(awk '/^Rss:/ {r=$2} /^Pss:/ {p=$2} END {print r+0, p+0}' "/proc/$pid/smaps_rollup" 2>/dev/null)"
    rss=$((rss + ${r:-0})); pss=$((pss + ${s:-0}))
    if [ -n "${DH_BENCH_SMAPS:-}" ]; then
      mkdir -p "$DH_BENCH_SMAPS"
      cp "/proc/$pid/smaps" "$DH_BENCH_SMAPS/$SIDE-$(cat "/proc/$pid/comm" 2>/dev/null)-$pid" 2>/dev/null || true
    fi
    names="$names$(cat "/proc/$pid/comm" 2>/dev/null)"$'\n'
  done
  echo "$rss $pss"
  printf '%s' "$names" | grep . | sort | uniq -c | awk '{printf "%s%s x%s", (NR>1 ? ", " : ""), $2, $1} END {print ""}' >&2
}

# ticks PID...: "pid ticks" (utime+stime+cutime+cstime, clock ticks) per PID still alive.
ticks() {
  local pid rest
  for pid in "$@"; do
    rest=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
    rest=${rest##*) }
    # after the comm: state is field 3, utime..cstime are fields 14..17
    read -r -a f <<<"$rest"
    echo "$pid $((f[11] + f[12] + f[13] + f[14]))"
  done
}
# cpu MARKER PID...: the % of one core `kept` used over IDLE seconds (a process is counted if it
# is alive at both samples; none are expected to come or go on an idle node).
cpu() {
  local -a ps; mapfile -t ps < <(kept "$@")
  local hz; hz=$(getconf CLK_TCK)
  ticks "${ps[@]}" >"$WORK/ticks0"; sleep "$IDLE"; ticks "${ps[@]}" >"$WORK/ticks1"
  awk -v hz="$hz" -v s="$IDLE" 'NR == FNR { t0[$1] = $2; next } ($1 in t0) { d += $2 - t0[$1] }
    END { printf "%.2f\n", d / hz / s * 100 }' "$WORK/ticks0" "$WORK/ticks1"
}

# ---- runs -----------------------------------------------------------------------------------------------
for s in up dh; do echo "warm-up: $s..." >&2; warmup "$s"; done
for s in up dh; do echo "seq: $s..." >&2; run_seq "$s"; done
for s in dh up; do echo "par: $s..." >&2; run_par "$s"; done

# ---- report ---------------------------------------------------------------------------------------------
stat() { # FILE COLUMN -> "median p99" (nearest rank)
  awk -v c="$2" '{print $c}' "$1" | sort -n | awk '{v[NR] = $1} END {
    if (NR == 0) { print "- -"; exit }
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    k = int(NR * 0.99 + 0.999999); if (k < 1) k = 1; if (k > NR) k = NR
    printf "%.1f %.1f\n", m, v[k] }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "-" && b + 0 > 0) printf "%.3fx", a / b; else print "-" }'; }
echo
printf 'Node pod start (created -> Ready, as the API server shows it) and deletion (deletionTimestamp ->\n'
printf 'object gone), %s pods one at a time (seq), %s at once (par), image %s, one watch stamping the events; ms\n' "$N" "$M" "$IMAGE"
printf 'deckhand: deckhand-kubelet + deckhand-cri + deckhand-bridge/host-local; upstream: kubelet %s + containerd %s + runc + bridge/host-local\n\n' \
  "$("$UP_KUBELET" --version 2>/dev/null | awk '{print $2}')" "$(containerd --version | awk '{print $3}')"
printf '%-10s | %9s %9s | %9s %9s | %9s %9s\n' "" "up med" "up p99" "dh med" "dh p99" "med" "p99"
printf '%-10s | %19s | %19s | %19s\n' "" "upstream" "deckhand" "deckhand/upstream"
for mode in seq par; do
  for col in 1:start 2:delete; do
    read -r um up99 <<<"$(stat "$WORK/up.$mode" "${col%%:*}")"
    read -r dm dp99 <<<"$(stat "$WORK/dh.$mode" "${col%%:*}")"
    printf '%-10s | %9s %9s | %9s %9s | %9s %9s\n' "$mode ${col#*:}" "$um" "$up99" "$dm" "$dp99" \
      "$(ratio "$dm" "$um")" "$(ratio "$dp99" "$up99")"
  done
done
echo
read -r urss upss <"$WORK/up.mem"; read -r drss dpss <"$WORK/dh.mem"
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
printf 'memory with %s running pods (kubelet + runtime daemon + per-pod processes, without the containers), MiB:\n' "$M"
printf '  %-44s RSS %8s   PSS %8s\n' "kubelet + containerd + shims + pause" "$(mib "$urss")" "$(mib "$upss")"
printf '  %-44s RSS %8s   PSS %8s\n' "deckhand-kubelet + deckhand-cri + monitors" "$(mib "$drss")" "$(mib "$dpss")"
printf '  %-44s RSS %8s   PSS %8s\n' "deckhand/upstream" "$(ratio "$drss" "$urss")" "$(ratio "$dpss" "$upss")"
ucpu=$(cat "$WORK/up.cpu"); dcpu=$(cat "$WORK/dh.cpu")
echo
printf 'idle CPU with %s running pods over %s s (the same processes), %% of one core:\n' "$M" "$IDLE"
printf '  %-44s %8s\n' "kubelet + containerd + shims + pause" "$ucpu"
printf '  %-44s %8s\n' "deckhand-kubelet + deckhand-cri + monitors" "$dcpu"
printf '  %-44s %8s\n' "deckhand/upstream" "$(ratio "$dcpu" "$ucpu")"
