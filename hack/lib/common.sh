# Shared helpers for Deckhand's hack/ scripts. Source it; do not run it.
# shellcheck shell=bash

DH_ROOT="${DH_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
# Cache for things that are slow to make and keyed by their inputs (kube binaries).
DH_CACHE="${DH_CACHE:-/var/cache/deckhand}"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root"; }

# dh_start DIR NAME CMD...: starts CMD in the background in its own session, output to
# DIR/logs/NAME.log, PID to DIR/pids/NAME.pid. Stopped only through that PID (dh_stop).
dh_start() {
  local dir=$1 name=$2; shift 2
  mkdir -p "$dir/logs" "$dir/pids"
  setsid "$@" </dev/null >>"$dir/logs/$name.log" 2>&1 &
  echo $! >"$dir/pids/$name.pid"
}

# dh_alive DIR NAME: is the recorded process still running?
dh_alive() {
  local f="$1/pids/$2.pid" pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  kill -0 "$pid" 2>/dev/null
}

# dh_stop DIR NAME: TERM the recorded PID, KILL it after 10 s; idempotent.
dh_stop() {
  local f="$1/pids/$2.pid" pid i
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$f"
}

# dh_wait DIR NAME SECONDS CMD...: polls CMD until it succeeds; fails loudly with the log tail
# if NAME's process died or SECONDS passed.
dh_wait() {
  local dir=$1 name=$2 secs=$3; shift 3
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ! dh_alive "$dir" "$name"; then
      tail -n 30 "$dir/logs/$name.log" >&2 || true
      die "$name exited during start-up (log: $dir/logs/$name.log)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 30 "$dir/logs/$name.log" >&2 || true
      die "$name not ready after ${secs}s (log: $dir/logs/$name.log)"
    fi
    sleep 0.2
  done
}
