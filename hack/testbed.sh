#!/usr/bin/env bash
# The Deckhand test bed: registries with the project's test images, containerd 1.6 + runc, and a
# control plane (etcd, kube-apiserver, kube-scheduler, kube-controller-manager 1.20).
#
#   hack/testbed.sh up [DIR]     start every part (idempotent); writes DIR/testbed.env
#   hack/testbed.sh down [DIR]   stop every part started there, by PID; remove DIR
#   hack/testbed.sh status [DIR] show what runs
#
# DIR defaults to $DH_TESTBED_DIR or /tmp/dh-testbed. Tests read DIR/testbed.env (through
# deckhand_tests::testbed, or DH_TESTBED_ENV). A part that cannot start fails the whole command.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
need_root

cmd=${1:-status}
DIR=${2:-${DH_TESTBED_DIR:-/tmp/dh-testbed}}
case "$DIR" in /*) ;; *) DIR="$PWD/$DIR" ;; esac
HERE="$DH_ROOT/hack/testbed"
PARTS=(registry containerd controlplane)

case "$cmd" in
up)
  mkdir -p "$DIR"
  if [ -z "${DH_TESTIMAGES_BIN:-}" ]; then
    log "building dh-testimages"
    (cd "$DH_ROOT" && cargo build -q -p deckhand-tests --bin dh-testimages)
    DH_TESTIMAGES_BIN="$DH_ROOT/target/debug/dh-testimages"
  fi
  export DH_TESTIMAGES_BIN
  for part in "${PARTS[@]}"; do
    log "test bed: starting $part"
    "$HERE/$part.sh" up "$DIR"
  done
  {
    echo "# Written by hack/testbed.sh up; read by deckhand_tests::testbed."
    echo "DH_TESTBED_DIR=$DIR"
    for part in "${PARTS[@]}"; do cat "$DIR/$part.env"; done
  } >"$DIR/testbed.env.tmp"
  mv "$DIR/testbed.env.tmp" "$DIR/testbed.env"
  log "test bed up: $DIR/testbed.env"
  ;;
down)
  [ -d "$DIR" ] || exit 0
  rc=0
  for ((i = ${#PARTS[@]} - 1; i >= 0; i--)); do
    "$HERE/${PARTS[i]}.sh" down "$DIR" || rc=1
  done
  [ "$rc" = 0 ] && rm -rf "$DIR"
  exit "$rc"
  ;;
status)
  [ -f "$DIR/testbed.env" ] || { echo "test bed not running in $DIR"; exit 1; }
  for f in "$DIR"/pids/*.pid; do
    [ -e "$f" ] || continue
    n=$(basename "$f" .pid)
    if dh_alive "$DIR" "$n"; then echo "running  $n (pid $(cat "$f"))"; else echo "DEAD     $n"; fi
  done
  grep -v '^#' "$DIR/testbed.env"
  ;;
*) die "usage: $0 up|down|status [DIR]" ;;
esac
