#!/usr/bin/env bash
# Brings up a local Deckhand node from nothing and shows it working.
#
#   hack/run-node.sh [DIR]        start (idempotent), print what runs and how to reach it
#   hack/run-node.sh stop [DIR]   stop everything this script started
#
# DIR defaults to /tmp/dh-node. Today this starts the test bed Deckhand is built against — a
# registry holding the project's images, containerd 1.6 + runc, and a 1.20 control plane — and
# deckhand-kubelet, which registers the node "dh-node" with that control plane, holds its Lease
# and reports its status, using containerd's CRI as its runtime until deckhand-cri serves the
# RuntimeService. Once pods run, this script starts a static demo pod (standalone when no API
# server is wanted, and with --apiserver against the local control plane).
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
need_root
cd "$DH_ROOT"

if [ "${1:-}" = stop ]; then
  DIR=${2:-/tmp/dh-node}
  [ -d "$DIR" ] && dh_stop "$DIR" deckhand-kubelet
  "$DH_ROOT/hack/testbed.sh" down "$DIR"
  log "stopped; $DIR removed"
  exit 0
fi
DIR=${1:-/tmp/dh-node}

"$DH_ROOT/hack/install-deps.sh"
log "kube binaries: $("$DH_ROOT/hack/build-kube.sh")"
log "building Deckhand"
cargo build --workspace --locked --bins
DH_TESTIMAGES_BIN="$DH_ROOT/target/debug/dh-testimages" "$DH_ROOT/hack/testbed.sh" up "$DIR"

# shellcheck disable=SC1091
set -a; . "$DIR/testbed.env"; set +a
kubectl=("$DH_KUBECTL" --kubeconfig "$DH_KUBECONFIG")

NODE=dh-node
"$DH_ROOT/hack/testbed/controlplane.sh" node-credentials "$DIR" "$NODE" "$DIR/node" >/dev/null
# A network for containerd's CRI (the reference bridge, on a bridge and subnet of our own), so
# the runtime reports NetworkReady and the node becomes Ready.
cat >"$DIR/containerd/cni/net.d/10-dh-node.conflist" <<CNI
{ "cniVersion": "0.4.0", "name": "dh-node",
  "plugins": [{ "type": "bridge", "bridge": "dh-node0", "isGateway": true, "ipMasq": false,
                "ipam": { "type": "host-local", "ranges": [[{ "subnet": "10.88.0.0/24" }]],
                          "dataDir": "$DIR/cni-ipam" } }] }
CNI
cat >"$DIR/node/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
nodeStatusUpdateFrequency: 5s
YAML
if ! dh_alive "$DIR" deckhand-kubelet; then
  dh_start "$DIR" deckhand-kubelet "$DH_ROOT/target/debug/deckhand-kubelet" \
    --kubeconfig "$DIR/node/kubeconfig" --config "$DIR/node/kubelet.yaml" \
    --hostname-override "$NODE" --node-ip 127.0.0.1 --root-dir "$DIR/kubelet" \
    --container-runtime-endpoint "unix://$DH_CONTAINERD_SOCKET"
fi
node_ready() {
  "${kubectl[@]}" get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' | grep -qx True
}
dh_wait "$DIR" deckhand-kubelet 60 "node $NODE Ready" node_ready

echo
echo "== Running (logs in $DIR/logs, PIDs in $DIR/pids)"
"$DH_ROOT/hack/testbed.sh" status "$DIR" | grep -E '^(running|DEAD)'
echo
echo "== Registry http://$DH_REGISTRY (anonymous) and http://$DH_REGISTRY_AUTH (user $DH_REGISTRY_AUTH_USER)"
curl -sf "http://$DH_REGISTRY/v2/_catalog"; echo
echo
echo "== containerd on $DH_CONTAINERD_SOCKET"
ctr --address "$DH_CONTAINERD_SOCKET" version | sed -n '/Server/,$p'
echo
echo "== kube-apiserver $DH_APISERVER"
"${kubectl[@]}" version --short 2>/dev/null | sed -n 2p || true
"${kubectl[@]}" get --raw /readyz; echo
"${kubectl[@]}" get namespaces
echo
echo "== deckhand-kubelet: node $NODE (log $DIR/logs/deckhand-kubelet.log)"
"${kubectl[@]}" get nodes -o wide
"${kubectl[@]}" get lease -n kube-node-lease "$NODE"
echo
cat <<MSG
== How to use it
  export KUBECONFIG=$DH_KUBECONFIG
  $DH_KUBECTL get pods -A
  ctr --address $DH_CONTAINERD_SOCKET images pull --plain-http $DH_REGISTRY/dh/busybox:latest
  curl http://$DH_REGISTRY/v2/dh/busybox/tags/list
Stop it with: hack/run-node.sh stop $DIR

deckhand-kubelet registers and maintains the node; it does not run pods yet, and deckhand-cri does
not serve the RuntimeService yet (see ARCHITECTURE.md and the issues).
MSG
