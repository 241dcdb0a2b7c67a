#!/usr/bin/env bash
# Builds kube-apiserver, kube-scheduler, kube-controller-manager (and the upstream kubelet, the
# benchmark peer) from Debian's source package `kubernetes`, and unpacks Debian's kubectl 1.20.
# Results are cached under $DH_CACHE/kube-<source version>/bin, so a second run builds nothing.
# Prints the bin directory on stdout.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
need_root

VERSION=$(dh_kube_source_version)
# RECIPE changes whenever this script builds differently, so stale binaries are never reused.
RECIPE=2
OUT="$DH_CACHE/kube-$VERSION-r$RECIPE"
BIN="$OUT/bin"
WANT=(kube-apiserver kube-scheduler kube-controller-manager kubelet)

have_all=1
for b in "${WANT[@]}" kubectl; do [ -x "$BIN/$b" ] || have_all=0; done
if [ "$have_all" = 1 ]; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$BIN"
WORK=$(mktemp -d /var/tmp/dh-kube-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

if [ ! -x "$BIN/kubectl" ]; then
  log "unpacking Debian's kubectl (kubernetes-client) into the cache"
  (cd "$WORK" && apt-get download -qq kubernetes-client >/dev/null && dpkg-deb -x kubernetes-client_*.deb client)
  install -m 0755 "$WORK/client/usr/bin/kubectl" "$BIN/kubectl"
fi

missing=()
for b in "${WANT[@]}"; do [ -x "$BIN/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "fetching the source of kubernetes $VERSION"
  (cd "$WORK" && apt-get source -qq --download-only kubernetes >/dev/null && dpkg-source -x kubernetes_*.dsc src >/dev/null)
  SRC="$WORK/src"
  # Kubernetes 1.20 vendors modern-go/reflect2 1.0.1, which panics at run time when built with
  # Go >= 1.18 (Debian 12 has 1.19): the API server crashes on ordinary requests. Build against
  # Debian's reflect2 1.0.2 instead, the fix upstream took in later releases.
  (cd "$WORK" && apt-get download -qq golang-github-modern-go-reflect2-dev >/dev/null \
    && dpkg-deb -x golang-github-modern-go-reflect2-dev_*.deb reflect2)
  r2="$WORK/reflect2/usr/share/gocode/src/github.com/modern-go/reflect2"
  [ -f "$r2/reflect2.go" ] || die "Debian's reflect2 source not found in golang-github-modern-go-reflect2-dev"
  rm -rf "$SRC/vendor/github.com/modern-go/reflect2"
  cp -r "$r2" "$SRC/vendor/github.com/modern-go/reflect2"
  rm -f "$SRC/vendor/github.com/modern-go/reflect2/go.mod"
  # As debian/rules does: a GOPATH whose k8s.io/kubernetes is the source tree, vendored modules.
  mkdir -p "$WORK/gopath/src/k8s.io"
  ln -s "$SRC" "$WORK/gopath/src/k8s.io/kubernetes"
  whats=""
  for b in "${missing[@]}"; do whats="$whats cmd/$b"; done
  log "building$whats (several minutes on 2 cores)"
  (
    cd "$WORK/gopath/src/k8s.io/kubernetes"
    export GOPATH="$WORK/gopath" GOCACHE="$WORK/gocache" CGO_ENABLED=0 HOME="$WORK"
    # "1.20.5+really1.20.2-1.1+deb12u1" is upstream 1.20.2: that is the version the binaries report.
    upstream=${VERSION##*really}; upstream=${upstream%%-*}
    export KUBE_GIT_TREE_STATE=clean KUBE_GIT_VERSION="v$upstream"
    make WHAT="${whats# }" >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; exit 1; }
  )
  for b in "${missing[@]}"; do
    install -m 0755 "$SRC/_output/local/bin/linux/amd64/$b" "$BIN/$b" 2>/dev/null \
      || install -m 0755 "$SRC/_output/bin/$b" "$BIN/$b"
  done
fi
log "kubernetes $VERSION binaries in $BIN"
echo "$BIN"
