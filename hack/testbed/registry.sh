#!/usr/bin/env bash
# The registries of the test bed: Debian's docker-registry on 127.0.0.1, storage under DIR.
#   registry.sh up DIR    starts an anonymous registry and an htpasswd-protected one, pushes the
#                         test images (built by dh-testimages) to both, writes DIR/registry.env
#   registry.sh down DIR  stops both (by recorded PID)
# Ports: DH_REGISTRY_PORT (35000) and DH_REGISTRY_AUTH_PORT (35001).
set -euo pipefail
. "$(dirname "$0")/../lib/common.sh"

cmd=${1:-}; DIR=${2:-}
[ -n "$cmd" ] && [ -n "$DIR" ] || die "usage: $0 up|down DIR"
PORT=${DH_REGISTRY_PORT:-35000}
AUTH_PORT=${DH_REGISTRY_AUTH_PORT:-35001}
R="$DIR/registry"

write_config() { # name port [auth]
  local name=$1 port=$2 auth=${3:-}
  mkdir -p "$R/$name"
  {
    echo "version: 0.1"
    echo "log: { level: warn, accesslog: { disabled: true } }"
    echo "storage:"
    echo "  filesystem: { rootdirectory: $R/$name/storage }"
    echo "  delete: { enabled: true }"
    echo "http: { addr: 127.0.0.1:$port, secret: dh-testbed-$name }"
    if [ -n "$auth" ]; then echo "auth: { htpasswd: { realm: dh-testbed, path: $R/htpasswd } }"; fi
  } >"$R/$name/config.yml"
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
  write_config plain "$PORT"
  write_config auth "$AUTH_PORT" yes
  for name in plain auth; do
    if ! dh_alive "$DIR" "registry-$name"; then
      port=$PORT; [ "$name" = auth ] && port=$AUTH_PORT
      dh_port_free "$port" || die "registry-$name: 127.0.0.1:$port is already in use (set DH_REGISTRY_PORT/DH_REGISTRY_AUTH_PORT)"
    fi
    dh_alive "$DIR" "registry-$name" || dh_start "$DIR" "registry-$name" docker-registry serve "$R/$name/config.yml"
  done
  dh_wait "$DIR" registry-plain 30 "/v2/" curl -sf "http://127.0.0.1:$PORT/v2/"
  dh_wait "$DIR" registry-auth 30 "/v2/" curl -sf -u "$user:$pass" "http://127.0.0.1:$AUTH_PORT/v2/"

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
ENV
  ;;
down)
  dh_stop "$DIR" registry-plain registry-auth
  ;;
*) die "usage: $0 up|down DIR" ;;
esac
