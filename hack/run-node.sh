#!/usr/bin/env bash
# Brings up a local Deckhand node from nothing and shows it working.
#
#   hack/run-node.sh [--apiserver] [DIR]   start (idempotent), print what runs and how to reach it
#   hack/run-node.sh stop [DIR]            stop everything this script started, remove the pods
#
# DIR defaults to /tmp/dh-node. It starts the test bed Deckhand is built against (a registry
# holding the project's images, containerd 1.6 + runc, a 1.20 control plane), then the node:
# deckhand-cri (the built-in runtime, Deckhand's CNI plugins on the bridge dh-node0 with
# 10.88.0.0/24) and deckhand-kubelet with a static-pod directory holding a demo pod (busybox
# httpd). Standalone by default (no API server: static pods only); with --apiserver the kubelet
# also registers the node "dh-node" with the local control plane, and the demo pod appears there
# as a mirror pod. It waits for the demo pod and fetches its page from its pod IP.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
need_root
cd "$DH_ROOT"

if [ "${1:-}" = stop ]; then
  DIR=${2:-/tmp/dh-node}
  if [ -d "$DIR" ]; then
    dh_stop "$DIR" deckhand-kubelet
    # The runtime keeps pods across its own restarts by design: remove them before stopping it.
    if dh_alive "$DIR" deckhand-cri; then
      "$DH_ROOT/target/debug/deckhand-crictl" -r "unix://$DIR/cri/cri.sock" rmp --all || true
    fi
    dh_stop "$DIR" deckhand-cri
    ip link del dh-node0 2>/dev/null || true
    awk -v d="$DIR" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
      umount -l "$m" 2>/dev/null || true
    done
  fi
  "$DH_ROOT/hack/testbed.sh" down "$DIR"
  log "stopped; $DIR removed"
  exit 0
fi
APISERVER=0
if [ "${1:-}" = --apiserver ]; then APISERVER=1; shift; fi
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
CRI="$DIR/cri"
mkdir -p "$CRI/net.d" "$DIR/manifests" "$DIR/node"
cat >"$CRI/net.d/10-dh-node.conflist" <<CNI
{ "cniVersion": "1.0.0", "name": "dh-node",
  "plugins": [
    { "type": "deckhand-bridge", "bridge": "dh-node0", "isGateway": true, "ipMasq": false,
      "ipam": { "type": "deckhand-host-local", "ranges": [[{ "subnet": "10.88.0.0/24" }]],
                "dataDir": "$CRI/ipam" } },
    { "type": "deckhand-portmap", "capabilities": { "portMappings": true } } ] }
CNI
: >"$CRI/cri.toml"
if ! dh_alive "$DIR" deckhand-cri; then
  dh_start "$DIR" deckhand-cri "$DH_ROOT/target/debug/deckhand-cri" --config "$CRI/cri.toml" \
    --socket "$CRI/cri.sock" --root "$CRI/root" --state-dir "$CRI/state" \
    --cni-conf-dir "$CRI/net.d" --cni-bin-dir "$DH_ROOT/target/debug"
fi
dh_wait "$DIR" deckhand-cri 30 "its socket" test -S "$CRI/cri.sock"

cat >"$DIR/manifests/demo.yaml" <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: demo
  namespace: default
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 2
  containers:
  - name: web
    image: $DH_REGISTRY/dh/httpd:latest
    ports: [{ containerPort: 8080 }]
YAML
# The kubelet's HTTPS API on 127.0.0.1:10250 with a serving certificate from the test bed's
# kubelet CA (which the API server trusts, so `kubectl logs/exec` work) and client certificates
# of the cluster CA; authorised by the API server (SubjectAccessReview) when there is one.
"$DH_ROOT/hack/testbed/controlplane.sh" node-credentials "$DIR" "$NODE" "$DIR/node" >/dev/null
AUTHZ=AlwaysAllow
[ "$APISERVER" = 1 ] && AUTHZ=Webhook
cat >"$DIR/node/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
nodeStatusUpdateFrequency: 5s
staticPodPath: $DIR/manifests
podLogsDir: $DIR/pod-logs
address: 127.0.0.1
port: 10250
tlsCertFile: $DIR/node/kubelet.crt
tlsPrivateKeyFile: $DIR/node/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: $([ "$APISERVER" = 1 ] && echo true || echo false)}
  x509: {clientCAFile: $DIR/node/ca.crt}
authorization: {mode: $AUTHZ}
YAML
kubelet_args=(--config "$DIR/node/kubelet.yaml" --hostname-override "$NODE" --node-ip 127.0.0.1
  --root-dir "$DIR/kubelet" --container-runtime-endpoint "unix://$CRI/cri.sock")
if [ "$APISERVER" = 1 ]; then
  kubelet_args+=(--kubeconfig "$DIR/node/kubeconfig")
fi
if ! dh_alive "$DIR" deckhand-kubelet; then
  dh_start "$DIR" deckhand-kubelet "$DH_ROOT/target/debug/deckhand-kubelet" "${kubelet_args[@]}"
fi
crictl=("$DH_ROOT/target/debug/deckhand-crictl" -r "unix://$CRI/cri.sock")
demo_ip() { "${crictl[@]}" pods | awk '$2 == "Ready" && $3 ~ /^demo-/ {print $5; exit}'; }
demo_up() { ip=$(demo_ip) && [ -n "$ip" ] && "${crictl[@]}" ps | grep -q ' web '; }
dh_wait "$DIR" deckhand-kubelet 90 "the demo pod running" demo_up
DEMO_IP=$(demo_ip)
node_ready() {
  "${kubectl[@]}" get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' | grep -qx True
}
[ "$APISERVER" = 1 ] && dh_wait "$DIR" deckhand-kubelet 60 "node $NODE Ready" node_ready

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
echo "== deckhand-cri on $CRI/cri.sock (log $DIR/logs/deckhand-cri.log)"
"${crictl[@]}" version
"${crictl[@]}" pods
"${crictl[@]}" ps
echo
echo "== The demo pod answers on its IP $DEMO_IP"
curl -sf "http://$DEMO_IP:8080/"
echo
if [ "$APISERVER" = 1 ]; then
  echo "== deckhand-kubelet: node $NODE (log $DIR/logs/deckhand-kubelet.log)"
  "${kubectl[@]}" get nodes -o wide
  "${kubectl[@]}" get pods -A -o wide
  echo "-- kubectl exec demo-$NODE -- hostname (through the API server and the kubelet's API)"
  "${kubectl[@]}" exec "demo-$NODE" -c web -- hostname || echo "(kubectl exec failed: see the kubelet log)"
else
  echo "== deckhand-kubelet: standalone, static pods from $DIR/manifests (log $DIR/logs/deckhand-kubelet.log)"
fi
echo
cat <<MSG
== How to use it
  $DH_ROOT/target/debug/deckhand-crictl -r unix://$CRI/cri.sock pods      # or ps, version
  drop a pod manifest into $DIR/manifests (it runs; remove the file and it goes)
  curl http://$DEMO_IP:8080/
  export KUBECONFIG=$DH_KUBECONFIG; $DH_KUBECTL get pods -A   # with --apiserver
  $DH_KUBECTL logs demo-$NODE; $DH_KUBECTL exec -it demo-$NODE -- sh   # with --apiserver
  curl --cacert $DIR/pki/kubelet-ca.crt --cert $DIR/pki/admin.crt --key $DIR/pki/admin.key \
    https://127.0.0.1:10250/pods          # the kubelet's own API
Stop it with: hack/run-node.sh stop $DIR
MSG
