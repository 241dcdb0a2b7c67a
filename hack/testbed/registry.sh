#!/usr/bin/env bash
# The registries of the test bed: Debian's docker-registry on 127.0.0.1, storage under DIR.
#   registry.sh up DIR    starts an anonymous registry and an htpasswd-protected one, pushes the
#                         test images (built by dh-testimages) to both, and starts a third that
#                         serves the anonymous one's storage over HTTPS with a certificate from a
#                         test CA (for CA-file tests); writes DIR/registry.env
#   registry.sh down DIR  stops them (by recorded PID)
# Ports: DH_REGISTRY_PORT (35000), DH_REGISTRY_AUTH_PORT (35001), DH_REGISTRY_TLS_PORT (35002).
set -euo pipefail
. "$(dirname "$0")/../lib/common.sh"

cmd=${1:-}; DIR=${2:-}
[ -n "$cmd" ] && [ -n "$DIR" ] || die "usage: $0 up|down DIR"
PORT=${DH_REGISTRY_PORT:-35000}
AUTH_PORT=${DH_REGISTRY_AUTH_PORT:-35001}
TLS_PORT=${DH_REGISTRY_TLS_PORT:-35002}
R="$DIR/registry"

write_config() { # name port storage-name [auth|tls]
  local name=$1 port=$2 storage=$3 extra=${4:-}
  mkdir -p "$R/$name"
  {
    echo "version: 0.1"
    echo "log: { level: warn, accesslog: { disabled: true } }"
    echo "storage:"
    echo "  filesystem: { rootdirectory: $R/$storage/storage }"
    echo "  delete: { enabled: true }"
    if [ "$extra" = tls ]; then
      echo "http: { addr: 127.0.0.1:$port, secret: dh-testbed-$name, tls: { certificate: $R/tls/server.crt, key: $R/tls/server.key } }"
    else
      echo "http: { addr: 127.0.0.1:$port, secret: dh-testbed-$name }"
    fi
    if [ "$extra" = auth ]; then echo "auth: { htpasswd: { realm: dh-testbed, path: $R/htpasswd } }"; fi
  } >"$R/$name/config.yml"
}

make_tls() { # a CA and a server certificate for 127.0.0.1/localhost, made once
  local t="$R/tls"
  [ -s "$t/server.crt" ] && return 0
  mkdir -p "$t"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=dh-testbed-registry-ca" -keyout "$t/ca.key" -out "$t/ca.crt" 2>/dev/null \
    || die "openssl: registry CA"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$t/server.key" -out "$t/server.csr" 2>/dev/null || die "openssl: registry key"
  printf 'subjectAltName = IP:127.0.0.1, DNS:localhost\nextendedKeyUsage = serverAuth\n' >"$t/ext"
  openssl x509 -req -in "$t/server.csr" -CA "$t/ca.crt" -CAkey "$t/ca.key" -CAcreateserial \
    -days 3650 -extfile "$t/ext" -out "$t/server.crt" 2>/dev/null || die "openssl: registry certificate"
}

case "$cmd" in
up)
  mkdir -p "$R"
  if [ ! -f "$R/credentials" ]; then
    pass=$(openssl rand -hex 12)
    printf 'dhuser %s\n' "$pass" >"$R/credentials"
    htpasswd -Bbn dhuser "$pass" >"$R/htpasswd"
  fi
  read -r user pass <"$R/credentials"
  make_tls
  write_config plain "$PORT" plain
  write_config auth "$AUTH_PORT" auth auth
  # The TLS instance serves the anonymous registry's storage read-only in practice (nothing is
  # pushed to it), so it holds the same images.
  write_config tls "$TLS_PORT" plain tls
  for name in plain auth tls; do
    if ! dh_alive "$DIR" "registry-$name"; then
      case "$name" in plain) port=$PORT ;; auth) port=$AUTH_PORT ;; tls) port=$TLS_PORT ;; esac
      dh_port_free "$port" || die "registry-$name: 127.0.0.1:$port is already in use (set DH_REGISTRY_PORT/_AUTH_PORT/_TLS_PORT)"
    fi
    dh_alive "$DIR" "registry-$name" || dh_start "$DIR" "registry-$name" docker-registry serve "$R/$name/config.yml"
  done
  dh_wait "$DIR" registry-plain 30 "/v2/" curl -sf "http://127.0.0.1:$PORT/v2/"
  dh_wait "$DIR" registry-auth 30 "/v2/" curl -sf -u "$user:$pass" "http://127.0.0.1:$AUTH_PORT/v2/"
  dh_wait "$DIR" registry-tls 30 "/v2/ over TLS" curl -sf --cacert "$R/tls/ca.crt" "https://127.0.0.1:$TLS_PORT/v2/"

  images=${DH_TESTIMAGES_BIN:?DH_TESTIMAGES_BIN must name the built dh-testimages binary}
  log "pushing test images to 127.0.0.1:$PORT and 127.0.0.1:$AUTH_PORT"
  "$images" push --registry "127.0.0.1:$PORT" --registry-storage "$R/plain/storage" \
    --index-out "$R/images.json" >>"$DIR/logs/testimages.log" 2>&1 \
    || { tail -n 30 "$DIR/logs/testimages.log" >&2; die "pushing test images failed"; }
  "$images" push --registry "127.0.0.1:$AUTH_PORT" --username "$user" --password "$pass" \
    --registry-storage "$R/auth/storage" --index-out "$R/images-auth.json" >>"$DIR/logs/testimages.log" 2>&1 \
    || { tail -n 30 "$DIR/logs/testimages.log" >&2; die "pushing test images (auth registry) failed"; }
  cat >"$DIR/registry.env" <<ENV
DH_REGISTRY=127.0.0.1:$PORT
DH_REGISTRY_AUTH=127.0.0.1:$AUTH_PORT
DH_REGISTRY_AUTH_USER=$user
DH_REGISTRY_AUTH_PASSWORD=$pass
DH_IMAGES_INDEX=$R/images.json
DH_REGISTRY_TLS=127.0.0.1:$TLS_PORT
DH_REGISTRY_TLS_CA=$R/tls/ca.crt
ENV
  ;;
down)
  dh_stop "$DIR" registry-tls registry-plain registry-auth
  ;;
*) die "usage: $0 up|down DIR" ;;
esac
