#!/usr/bin/env bash
# Brings up a local Deckhand node from nothing and shows it working.
#
#   hack/run-node.sh [DIR]        start (idempotent), print what runs and how to reach it
#   hack/run-node.sh stop [DIR]   stop everything this script started
#
# DIR defaults to /tmp/dh-node. Today this starts the test bed Deckhand is built against — a
# registry holding the project's images, containerd 1.6 + runc, and a 1.20 control plane — and
# shows each part answering. As deckhand-cri and deckhand-kubelet land, this script starts them
# too: standalone with a static demo pod, and with --apiserver against the local control plane.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
need_root
cd "$DH_ROOT"

if [ "${1:-}" = stop ]; then
  DIR=${2:-/tmp/dh-node}
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
cat <<MSG
== How to use it
  export KUBECONFIG=$DH_KUBECONFIG
  $DH_KUBECTL get pods -A
  ctr --address $DH_CONTAINERD_SOCKET images pull --plain-http $DH_REGISTRY/dh/busybox:latest
  curl http://$DH_REGISTRY/v2/dh/busybox/tags/list
Stop it with: hack/run-node.sh stop $DIR

deckhand-cri and deckhand-kubelet are not implemented yet (see ARCHITECTURE.md and the issues);
this node runs the parts they are built and tested against.
MSG
