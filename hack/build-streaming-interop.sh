#!/usr/bin/env bash
# Builds dh-streaming-interop (streaming/tests/interop/main.go): upstream's streaming client
# (client-go remotecommand + portforward) and CRI streaming server, compiled inside Debian's
# `kubernetes` source package against its vendor directory (offline; GOPATH mode with the tree
# as k8s.io/kubernetes, as the package's own build does).
# streaming/tests/interop_go.rs runs it to check deckhand-streaming against the Go implementation.
# Cached in $DH_CACHE/streaming-interop-<source version>-<hash of main.go>/; a second run builds
# nothing. Prints the binary's path on stdout.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
need_root

MAIN="$DH_ROOT/streaming/tests/interop/main.go"
[ -f "$MAIN" ] || die "$MAIN not found"

VERSION=$(dh_kube_source_version)
# RECIPE changes whenever this script builds differently.
RECIPE=1
KEY=$(cat "$0" "$MAIN" | sha256sum | cut -c1-12)
OUT="$DH_CACHE/streaming-interop-$VERSION-r$RECIPE-$KEY"
BIN="$OUT/dh-streaming-interop"
if [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$OUT"
WORK=$(mktemp -d /var/tmp/dh-streaming-interop.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
log "fetching the source of kubernetes $VERSION"
(cd "$WORK" && apt-get source -qq --download-only kubernetes >/dev/null && dpkg-source -x kubernetes_*.dsc src >/dev/null)
SRC="$WORK/src"
# As hack/build-kube.sh: the vendored reflect2 1.0.1 panics with Go >= 1.18; use Debian's 1.0.2.
(cd "$WORK" && apt-get download -qq golang-github-modern-go-reflect2-dev >/dev/null \
  && dpkg-deb -x golang-github-modern-go-reflect2-dev_*.deb reflect2)
r2="$WORK/reflect2/usr/share/gocode/src/github.com/modern-go/reflect2"
[ -f "$r2/reflect2.go" ] || die "Debian's reflect2 source not found in golang-github-modern-go-reflect2-dev"
rm -rf "$SRC/vendor/github.com/modern-go/reflect2"
cp -r "$r2" "$SRC/vendor/github.com/modern-go/reflect2"
rm -f "$SRC/vendor/github.com/modern-go/reflect2/go.mod"

mkdir -p "$SRC/cmd/dh-streaming-interop"
cp "$MAIN" "$SRC/cmd/dh-streaming-interop/main.go"
log "building dh-streaming-interop (a few minutes on 2 cores)"
mkdir -p "$WORK/gopath/src/k8s.io"
ln -s "$SRC" "$WORK/gopath/src/k8s.io/kubernetes"
(
  cd "$WORK/gopath/src/k8s.io/kubernetes"
  export GO111MODULE=off GOCACHE="$WORK/gocache" GOPATH="$WORK/gopath" CGO_ENABLED=0 HOME="$WORK"
  go build -trimpath -o "$WORK/dh-streaming-interop" ./cmd/dh-streaming-interop >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log" >&2; exit 1; }
)
install -m 0755 "$WORK/dh-streaming-interop" "$BIN"
log "dh-streaming-interop in $OUT"
echo "$BIN"
