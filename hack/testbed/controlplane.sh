#!/usr/bin/env bash
# The control plane of the test bed: etcd 3.4 (Debian) and kube-apiserver, kube-scheduler,
# kube-controller-manager 1.20 (built by hack/build-kube.sh), all on 127.0.0.1, TLS client certs
# from a PKI made with openssl. Everything (PKI, etcd data, logs, PIDs) lives under DIR.
#   controlplane.sh up DIR                          PKI, start, wait ready, write DIR/controlplane.env
#   controlplane.sh down DIR                        stop the recorded PIDs (TERM, then KILL)
#   controlplane.sh node-credentials DIR NODE OUT   kubelet client cert + kubeconfig, serving cert
# Ports: DH_ETCD_PORT (32379), DH_ETCD_PEER_PORT (32380), DH_APISERVER_PORT (36443),
# DH_SCHEDULER_PORT (36259) and DH_CONTROLLER_MANAGER_PORT (36257), the last two only for /healthz.
# DH_KUBE_BIN names the directory of the kube binaries; unset, hack/build-kube.sh provides it.
# DH_CP_TIMEOUT (seconds, 120) bounds each wait of `up`.
set -euo pipefail
# shellcheck source=../lib/common.sh
. "$(dirname "$0")/../lib/common.sh"

usage() { die "usage: $0 up DIR | down DIR | node-credentials DIR NODENAME OUTDIR"; }

cmd=${1:-}; DIR=${2:-}
if [ -z "$cmd" ] || [ -z "$DIR" ]; then usage; fi

ETCD_PORT=${DH_ETCD_PORT:-32379}
ETCD_PEER_PORT=${DH_ETCD_PEER_PORT:-32380}
API_PORT=${DH_APISERVER_PORT:-36443}
SCHED_PORT=${DH_SCHEDULER_PORT:-36259}
KCM_PORT=${DH_CONTROLLER_MANAGER_PORT:-36257}
SERVICE_CIDR=${DH_SERVICE_CIDR:-10.96.0.0/16}
CLUSTER_CIDR=${DH_CLUSTER_CIDR:-10.244.0.0/16}
TIMEOUT=${DH_CP_TIMEOUT:-120}
SA_ISSUER=https://kubernetes.default.svc.cluster.local

abs_dir() { mkdir -p "$1" && (cd "$1" && pwd); }

# ---------------------------------------------------------------------------------------------
# PKI (openssl, ECDSA P-256 keys in PKCS#8, certificates valid for 10 years)

first_ip() { # CIDR -> its network address + 1
  local ip=${1%/*} bits=${1#*/} a b c d n
  [[ "$1" =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}/([0-9]|[12][0-9]|3[0-2])$ ]] || die "bad IPv4 CIDR '$1'"
  IFS=. read -r a b c d <<<"$ip"
  n=$(( ((a << 24) | (b << 16) | (c << 8) | d) & (0xffffffff << (32 - bits)) & 0xffffffff ))
  n=$((n + 1))
  printf '%d.%d.%d.%d' $(((n >> 24) & 255)) $(((n >> 16) & 255)) $(((n >> 8) & 255)) $((n & 255))
}

ssl_conf() { # FILE EXTENSION-LINES...: a minimal openssl config with an [ext] section
  local f=$1; shift
  { printf '[req]\ndistinguished_name = dn\n[dn]\n[ext]\n'; printf '%s\n' "$@"; } >"$f"
}

gen_key() { # KEY
  [ -s "$1" ] && return 0
  (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null) \
    || die "openssl genpkey $1 failed"
}

cert_ok() { # CERT CA: exists, is signed by CA, valid for at least another day
  [ -s "$1" ] && openssl verify -CAfile "$2" "$1" >/dev/null 2>&1 \
    && openssl x509 -in "$1" -noout -checkend 86400 >/dev/null 2>&1
}

gen_ca() { # BASENAME CN
  local base=$1 cn=$2 conf
  gen_key "$base.key"
  cert_ok "$base.crt" "$base.crt" && return 0
  log "pki: CA $cn"
  conf=$(mktemp); ssl_conf "$conf" 'basicConstraints = critical,CA:TRUE' \
    'keyUsage = critical,keyCertSign,cRLSign,digitalSignature' 'subjectKeyIdentifier = hash'
  openssl req -x509 -new -key "$base.key" -subj "/CN=$cn" -days 3650 -sha256 \
    -config "$conf" -extensions ext -out "$base.crt" 2>/dev/null || { rm -f "$conf"; die "openssl: CA $cn"; }
  rm -f "$conf"
}

gen_cert() { # CA-BASENAME BASENAME SUBJECT client|server|both [SAN]
  local ca=$1 base=$2 subj=$3 kind=$4 san=${5:-} eku conf csr spec
  gen_key "$base.key"
  # BASENAME.spec remembers what the certificate was made for: another subject or SAN remakes it.
  spec="$subj $kind $san"
  [ "$(cat "$base.spec" 2>/dev/null)" = "$spec" ] && cert_ok "$base.crt" "$ca.crt" && return 0
  log "pki: $subj ($kind)"
  case "$kind" in
    client) eku=clientAuth ;;
    server) eku=serverAuth ;;
    both) eku=serverAuth,clientAuth ;;
    *) die "gen_cert: bad kind $kind" ;;
  esac
  conf=$(mktemp); csr=$(mktemp)
  ssl_conf "$conf" 'basicConstraints = critical,CA:FALSE' 'keyUsage = critical,digitalSignature' \
    "extendedKeyUsage = $eku" 'subjectKeyIdentifier = hash' 'authorityKeyIdentifier = keyid:always' \
    ${san:+"subjectAltName = $san"}
  if ! { openssl req -new -key "$base.key" -subj "$subj" -config "$conf" -out "$csr" \
      && openssl x509 -req -in "$csr" -CA "$ca.crt" -CAkey "$ca.key" -set_serial "0x$(openssl rand -hex 16)" \
        -days 3650 -sha256 -extfile "$conf" -extensions ext -out "$base.crt"; } >/dev/null 2>&1; then
    rm -f "$conf" "$csr" "$base.crt"; die "openssl: certificate $subj"
  fi
  rm -f "$conf" "$csr"
  printf '%s\n' "$spec" >"$base.spec"
}

write_kubeconfig() { # FILE USER CERT KEY CA
  local tmp="$1.tmp"
  cat >"$tmp" <<YAML
apiVersion: v1
kind: Config
clusters:
- name: dh
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $5
users:
- name: $2
  user:
    client-certificate: $3
    client-key: $4
contexts:
- name: dh
  context:
    cluster: dh
    user: $2
current-context: dh
YAML
  chmod 600 "$tmp" && mv -f "$tmp" "$1"
}

make_pki() {
  local svc_ip
  svc_ip=$(first_ip "$SERVICE_CIDR")
  mkdir -p "$PKI"
  gen_ca "$PKI/ca" dh-cluster-ca
  gen_ca "$PKI/kubelet-ca" dh-kubelet-serving-ca
  gen_cert "$PKI/ca" "$PKI/apiserver" /CN=dh-kube-apiserver server \
    "IP:127.0.0.1,IP:$svc_ip,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  gen_cert "$PKI/ca" "$PKI/apiserver-kubelet-client" /O=system:masters/CN=dh-apiserver-kubelet-client client
  gen_cert "$PKI/ca" "$PKI/admin" /O=system:masters/CN=dh-admin client
  gen_cert "$PKI/ca" "$PKI/kube-scheduler" /CN=system:kube-scheduler client
  gen_cert "$PKI/ca" "$PKI/kube-controller-manager" /CN=system:kube-controller-manager client
  gen_key "$PKI/sa.key"
  [ -s "$PKI/sa.pub" ] || openssl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null \
    || die "openssl: service-account public key"
  write_kubeconfig "$DIR/admin.kubeconfig" dh-admin "$PKI/admin.crt" "$PKI/admin.key" "$PKI/ca.crt"
  write_kubeconfig "$DIR/kube-scheduler.kubeconfig" system:kube-scheduler \
    "$PKI/kube-scheduler.crt" "$PKI/kube-scheduler.key" "$PKI/ca.crt"
  write_kubeconfig "$DIR/kube-controller-manager.kubeconfig" system:kube-controller-manager \
    "$PKI/kube-controller-manager.crt" "$PKI/kube-controller-manager.key" "$PKI/ca.crt"
}

# ---------------------------------------------------------------------------------------------
# Processes: started, waited for and stopped through hack/lib/common.sh (dh_start, dh_wait,
# dh_stop), which only ever signal a recorded PID whose command line still names DIR.

start() { # NAME PORT... -- COMMAND...: refuses busy ports, then dh_start
  local name=$1; shift
  while [ "$1" != -- ]; do
    dh_port_free "$1" || die "$name: 127.0.0.1:$1 is already in use (set its DH_*_PORT)"
    shift
  done
  shift
  : >"$DIR/logs/$name.log"
  dh_start "$DIR" "$name" "$@"
}

stop_all() { dh_stop "$DIR" kube-controller-manager kube-scheduler kube-apiserver etcd; }

on_up_exit() { # a failed `up` stops what is running, unless DH_CP_KEEP_ON_FAILURE=1
  local rc=$?
  [ "$rc" = 0 ] || [ "${DH_CP_KEEP_ON_FAILURE:-0}" = 1 ] || { log "up failed: stopping the control plane"; stop_all || true; }
}

wait_for() { dh_wait "$DIR" "$1" "$TIMEOUT" "$2" "${@:3}"; }

api_get() { # PATH [GREP-PATTERN]: GET on the API server as the admin
  local out
  out=$(curl -sf --max-time 5 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "https://127.0.0.1:$API_PORT$1") || return 1
  [ -z "${2:-}" ] || grep -q -- "$2" <<<"$out"
}

api() { # METHOD PATH [JSON-BODY]: a request to the API server as the admin
  curl -sf --max-time 5 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    -X "$1" -H 'Content-Type: application/json' ${3:+--data "$3"} "https://127.0.0.1:$API_PORT$2"
}

healthz() { curl -skf --max-time 5 "https://127.0.0.1:$1/healthz" | grep -qx ok; }

kube_bin() {
  if [ -n "${DH_KUBE_BIN:-}" ]; then echo "$DH_KUBE_BIN"; return; fi
  "$DH_ROOT/hack/build-kube.sh"
}

# ---------------------------------------------------------------------------------------------

case "$cmd" in
up)
  [ $# -eq 2 ] || usage
  DIR=$(abs_dir "$DIR"); PKI="$DIR/pki"
  rm -f "$DIR/controlplane.env"
  trap on_up_exit EXIT
  mkdir -p "$DIR/logs" "$DIR/pids" "$DIR/etcd"
  chmod 700 "$DIR/etcd"
  BIN=$(kube_bin) || die "no kube binaries (hack/build-kube.sh failed)"
  for b in kube-apiserver kube-scheduler kube-controller-manager kubectl; do
    [ -x "$BIN/$b" ] || die "$BIN/$b is missing"
  done
  command -v etcd >/dev/null || die "etcd is not installed (etcd-server)"
  make_pki

  dh_alive "$DIR" etcd || start etcd "$ETCD_PORT" "$ETCD_PEER_PORT" -- etcd \
    --name dh-etcd --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "dh-etcd=http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster-token dh-etcd --initial-cluster-state new \
    --quota-backend-bytes $((512 * 1024 * 1024)) --snapshot-count 10000 \
    --auto-compaction-mode periodic --auto-compaction-retention 10m \
    --logger zap --log-level warn
  wait_for etcd "/health" curl -sf --max-time 5 "http://127.0.0.1:$ETCD_PORT/health"

  dh_alive "$DIR" kube-apiserver || start kube-apiserver "$API_PORT" -- "$BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
    --cert-dir "$PKI/apiserver-generated" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --service-account-issuer "$SA_ISSUER" --api-audiences "$SA_ISSUER" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction --allow-privileged=true \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority "$PKI/kubelet-ca.crt" \
    --kubelet-preferred-address-types InternalIP,Hostname \
    --endpoint-reconciler-type none \
    --profiling=false --v 1
  wait_for kube-apiserver "/readyz" api_get /readyz

  # The secure ports of the scheduler and the controller-manager serve /healthz only: without
  # --authentication-kubeconfig they skip the extension-apiserver-authentication lookup (this
  # API server has no request-header CA, so the lookup would retry forever) and every request
  # is anonymous, which the always-allowed /healthz accepts and everything else refuses.
  dh_alive "$DIR" kube-scheduler || start kube-scheduler "$SCHED_PORT" -- "$BIN/kube-scheduler" \
    --kubeconfig "$DIR/kube-scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$SCHED_PORT" --port 0 \
    --leader-elect=false --profiling=false --v 1
  dh_alive "$DIR" kube-controller-manager || start kube-controller-manager "$KCM_PORT" -- \
    "$BIN/kube-controller-manager" \
    --kubeconfig "$DIR/kube-controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --port 0 \
    --leader-elect=false --cluster-name dh --kube-api-qps 50 --kube-api-burst 100 \
    --use-service-account-credentials=true \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --cluster-signing-kubelet-client-cert-file "$PKI/ca.crt" \
    --cluster-signing-kubelet-client-key-file "$PKI/ca.key" \
    --cluster-signing-kube-apiserver-client-cert-file "$PKI/ca.crt" \
    --cluster-signing-kube-apiserver-client-key-file "$PKI/ca.key" \
    --cluster-signing-legacy-unknown-cert-file "$PKI/ca.crt" \
    --cluster-signing-legacy-unknown-key-file "$PKI/ca.key" \
    --cluster-signing-kubelet-serving-cert-file "$PKI/kubelet-ca.crt" \
    --cluster-signing-kubelet-serving-key-file "$PKI/kubelet-ca.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --allocate-node-cidrs=true --cluster-cidr "$CLUSTER_CIDR" --node-cidr-mask-size 24 \
    --profiling=false --v 1
  wait_for kube-scheduler "/healthz" healthz "$SCHED_PORT"
  wait_for kube-controller-manager "/healthz" healthz "$KCM_PORT"
  # Pods need the default service account and (1.20) its token secret; kubelets need the lease
  # namespace. Both show that the controller-manager and the API server's bootstrap ran.
  wait_for kube-controller-manager "the default service account's token" \
    api_get /api/v1/namespaces/default/serviceaccounts/default '"secrets"'
  wait_for kube-apiserver "namespace kube-node-lease" api_get /api/v1/namespaces/kube-node-lease
  # With a reused DIR those exist already, while the controller-manager may still be starting
  # its controllers (node IPAM alone waits 10s). A service account appearing in a fresh probe
  # namespace shows that its controllers run; the namespace is deleted again right away.
  probe="dh-cp-ready-$(date +%s)"
  api POST /api/v1/namespaces "{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{\"name\":\"$probe\"}}" \
    >/dev/null || dh_fail "$DIR" kube-apiserver "cannot create namespace $probe"
  wait_for kube-controller-manager "a service account in namespace $probe" \
    api_get "/api/v1/namespaces/$probe/serviceaccounts/default" '"secrets"'
  api DELETE "/api/v1/namespaces/$probe" >/dev/null || dh_fail "$DIR" kube-apiserver "cannot delete namespace $probe"

  cat >"$DIR/controlplane.env.tmp" <<ENV
DH_APISERVER=https://127.0.0.1:$API_PORT
DH_KUBECONFIG=$DIR/admin.kubeconfig
DH_PKI_DIR=$PKI
DH_KUBE_BIN=$BIN
DH_KUBECTL=$BIN/kubectl
DH_ETCD=http://127.0.0.1:$ETCD_PORT
DH_SERVICE_CIDR=$SERVICE_CIDR
DH_CLUSTER_CIDR=$CLUSTER_CIDR
ENV
  mv -f "$DIR/controlplane.env.tmp" "$DIR/controlplane.env"
  log "control plane ready at https://127.0.0.1:$API_PORT ($DIR/controlplane.env)"
  ;;
down)
  [ $# -eq 2 ] || usage
  [ -d "$DIR" ] || exit 0
  DIR=$(cd "$DIR" && pwd)
  stop_all
  rm -f "$DIR/controlplane.env"
  ;;
node-credentials)
  [ $# -eq 4 ] || usage
  NODE=$3; OUT=$4
  [[ "$NODE" =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$ ]] \
    || die "node name '$NODE' is not a DNS-1123 subdomain"
  DIR=$(abs_dir "$DIR"); PKI="$DIR/pki"; OUT=$(abs_dir "$OUT")
  if [ ! -s "$PKI/ca.key" ] || [ ! -s "$PKI/kubelet-ca.key" ]; then make_pki; fi
  gen_cert "$PKI/ca" "$OUT/kubelet-client" "/O=system:nodes/CN=system:node:$NODE" client
  gen_cert "$PKI/kubelet-ca" "$OUT/kubelet" "/CN=$NODE" server "DNS:$NODE,IP:127.0.0.1"
  cp -f "$PKI/ca.crt" "$OUT/ca.crt"
  write_kubeconfig "$OUT/kubeconfig" "system:node:$NODE" "$OUT/kubelet-client.crt" \
    "$OUT/kubelet-client.key" "$OUT/ca.crt"
  cat >"$OUT/node.env" <<ENV
DH_NODE_NAME=$NODE
DH_NODE_KUBECONFIG=$OUT/kubeconfig
DH_NODE_CLIENT_CERT=$OUT/kubelet-client.crt
DH_NODE_CLIENT_KEY=$OUT/kubelet-client.key
DH_NODE_SERVING_CERT=$OUT/kubelet.crt
DH_NODE_SERVING_KEY=$OUT/kubelet.key
DH_NODE_CLIENT_CA=$OUT/ca.crt
ENV
  log "credentials for node $NODE in $OUT"
  ;;
*) usage ;;
esac
