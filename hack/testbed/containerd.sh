#!/usr/bin/env bash
# containerd 1.6 + runc from Debian for the test bed: the containerd backend's peer and the
# benchmark peer. Its root, state, socket and CNI config live under DIR, never the host's paths.
#   containerd.sh up DIR    starts it, writes DIR/containerd.env
#   containerd.sh down DIR  stops it (by recorded PID) and unmounts what it left under DIR
set -euo pipefail
. "$(dirname "$0")/../lib/common.sh"

cmd=${1:-}; DIR=${2:-}
[ -n "$cmd" ] && [ -n "$DIR" ] || die "usage: $0 up|down DIR"
C="$DIR/containerd"

case "$cmd" in
up)
  mkdir -p "$C/root" "$C/state" "$C/cni/net.d" "$C/certs.d"
  cat >"$C/config.toml" <<TOML
version = 2
root = "$C/root"
state = "$C/state"
# Never touch the OOM score of the host's processes.
oom_score = 0

[grpc]
  address = "$C/containerd.sock"

[debug]
  level = "warn"

[plugins."io.containerd.grpc.v1.cri"]
  # Root here lacks CAP_SYS_RESOURCE: negative oom_score_adj values must be clamped.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # No internet: the sandbox (pause) image is the project's own, in the local registry.
  sandbox_image = "127.0.0.1:${DH_REGISTRY_PORT:-35000}/dh/pause:latest"
  enable_cdi = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$C/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$C/certs.d"
TOML
  dh_alive "$DIR" containerd || dh_start "$DIR" containerd containerd --config "$C/config.toml"
  dh_wait "$DIR" containerd 30 "its socket" ctr --address "$C/containerd.sock" version
  cat >"$DIR/containerd.env" <<ENV
DH_CONTAINERD_SOCKET=$C/containerd.sock
DH_CONTAINERD_CONFIG=$C/config.toml
ENV
  ;;
down)
  dh_stop "$DIR" containerd
  # Shims outlive containerd by design; the test bed's own shims (their cmdline names our
  # socket) are stopped too, and any mount containerd left below DIR is removed.
  for p in /proc/[0-9]*; do
    if tr "\0" " " 2>/dev/null <"$p/cmdline" | grep -qF -- "$C/containerd.sock"; then
      kill -KILL "${p#/proc/}" 2>/dev/null || true
    fi
  done
  if [ -d "$C" ]; then
    awk -v c="$C" 'index($5, c) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
      umount -l "$m" 2>/dev/null || true
    done
  fi
  ;;
*) die "usage: $0 up|down DIR" ;;
esac
