#!/usr/bin/env bash
# Installs what Deckhand needs to build and to run its test bed, from Debian's packages.
# Idempotent: a second run installs nothing and returns quickly.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
need_root

PKGS=(
  # build
  protobuf-compiler pkg-config gcc make git curl
  # test bed
  docker-registry apache2-utils containerd runc etcd-server openssl busybox-static
  containernetworking-plugins iproute2 iptables nftables procps psmisc
  # peers in the benchmarks: conmon (hack/bench/monitor.sh), crun (hack/bench/runtime.sh)
  conmon crun
  # building kube-apiserver & co. from Debian's source package
  golang-go rsync dpkg-dev
  # the pure cgroup v2 tests boot Debian's kernel under QEMU (this host's cgroups are hybrid)
  qemu-system-x86
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Debian's docker-registry and containerd packages try to start services via init
  # scripts; there is no init system here, so keep them from starting anything.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

# A Debian kernel for the VM tests, unpacked from its package (not installed: the host keeps its
# own kernel and /boot untouched).
VM_KERNEL="$DH_CACHE/vm-kernel/vmlinuz"
if [ ! -s "$VM_KERNEL" ]; then
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
  [ -n "$pkg" ] || die "cannot resolve linux-image-amd64 to a kernel package"
  log "unpacking the kernel of $pkg for the VM tests"
  tmp=$(mktemp -d /var/tmp/dh-kernel.XXXXXX)
  (cd "$tmp" && apt-get download -qq "$pkg" >/dev/null 2>&1 && dpkg-deb --fsys-tarfile "$pkg"_*.deb \
    | tar -x -C "$tmp" --wildcards './boot/vmlinuz-*') || { rm -rf "$tmp"; die "downloading $pkg failed"; }
  mkdir -p "$(dirname "$VM_KERNEL")"
  cp "$tmp"/boot/vmlinuz-* "$VM_KERNEL.tmp" && mv "$VM_KERNEL.tmp" "$VM_KERNEL"
  rm -rf "$tmp"
fi

command -v cargo >/dev/null || die "cargo not found: Deckhand needs a Rust toolchain (rustup)"
log "dependencies present"
