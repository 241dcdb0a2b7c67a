# Shared helpers for Deckhand's hack/ scripts. Source it; do not run it.
# shellcheck shell=bash

DH_ROOT="${DH_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
# Cache for things that are slow to make and keyed by their inputs (kube binaries).
DH_CACHE="${DH_CACHE:-/var/cache/deckhand}"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root"; }

# Daemons of the test bed and the local node are recorded as DIR/pids/NAME.pid and logged to
# DIR/logs/NAME.log. Every daemon's command line names a path below DIR, and a PID counts as ours
# only while that holds: a reused PID is never signalled. Nothing is ever stopped by name.

# dh_pid DIR NAME: prints the PID of NAME if it is alive (not a zombie) and still ours.
dh_pid() {
  local f="$1/pids/$2.pid" pid state cmdline
  [ -s "$f" ] || return 1
  read -r pid <"$f" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] || return 1
  cmdline=$( { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null) || return 1
  case "$cmdline" in *"$1/"*) echo "$pid" ;; *) return 1 ;; esac
}

dh_alive() { dh_pid "$1" "$2" >/dev/null; }

# dh_port_free PORT: nothing listens on TCP PORT.
dh_port_free() { ! ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

# dh_start DIR NAME CMD...: starts CMD in its own session; its exact PID goes to the PID file
# (a wrapper records its own PID, then execs CMD, which keeps it).
dh_start() {
  local dir=$1 name=$2; shift 2
  mkdir -p "$dir/logs" "$dir/pids"
  log "starting $name"
  # shellcheck disable=SC2016
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$dir/pids/$name.pid" "$@" \
    </dev/null >>"$dir/logs/$name.log" 2>&1 &
  for _ in $(seq 1 50); do dh_alive "$dir" "$name" && return 0; sleep 0.1; done
  dh_fail "$dir" "$name" "did not start"
}

# dh_fail DIR NAME MESSAGE: shows the end of NAME's log and exits non-zero.
dh_fail() {
  local f="$1/logs/$2.log"
  log "error: $2: $3"
  # klog's error lines (E1123 ...) say more than the last lines of a chatty log.
  if grep -qE '^[EF][0-9]{4} ' "$f" 2>/dev/null; then
    log "last errors in $f:"
    grep -E '^[EF][0-9]{4} ' "$f" | tail -n 10 | cut -c1-400 >&2
  fi
  log "last lines of $f:"
  { grep -v 'flags.go:[0-9]*\] FLAG: ' "$f" | tail -n 30 | cut -c1-400 >&2; } 2>/dev/null || true
  exit 1
}

# dh_wait DIR NAME SECONDS WHAT CMD...: polls CMD until it succeeds; fails loudly if NAME dies
# or SECONDS pass.
dh_wait() {
  local dir=$1 name=$2 secs=$3 what=$4; shift 4
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    dh_alive "$dir" "$name" || dh_fail "$dir" "$name" "exited while waiting for $what"
    [ "$SECONDS" -lt "$deadline" ] || dh_fail "$dir" "$name" "no $what after ${secs}s"
    sleep 0.2
  done
}

# _dh_wait_gone TENTHS DIR NAME...: waits up to TENTHS tenths of a second for all NAMEs to exit.
_dh_wait_gone() {
  local tenths=$1 dir=$2 name left; shift 2
  for _ in $(seq 1 "$tenths"); do
    left=0
    for name in "$@"; do dh_alive "$dir" "$name" && left=1; done
    [ "$left" = 0 ] && return 0
    sleep 0.1
  done
  return 1
}

# dh_stop DIR NAME...: TERM each (in the order given), KILL what is left after 5 s; idempotent.
dh_stop() {
  local dir=$1 name pid; shift
  for name in "$@"; do
    if pid=$(dh_pid "$dir" "$name"); then
      log "stopping $name ($pid)"
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  if ! _dh_wait_gone 50 "$dir" "$@"; then
    for name in "$@"; do
      if pid=$(dh_pid "$dir" "$name"); then
        log "killing $name ($pid)"
        kill -KILL "$pid" 2>/dev/null || true
      fi
    done
    _dh_wait_gone 30 "$dir" "$@" || true
  fi
  for name in "$@"; do
    dh_alive "$dir" "$name" && die "$name is still running"
    rm -f "$dir/pids/$name.pid"
  done
  return 0
}

# Prints the version of Debian's source package `kubernetes`, first adding a deb-src line for
# Debian's source packages if apt knows none (the kube build and the streaming interop helper
# are both built from it).
dh_kube_source_version() {
  if [ -z "$(apt-cache showsrc kubernetes 2>/dev/null)" ]; then
    log "adding a deb-src line for Debian's source packages"
    cat > /etc/apt/sources.list.d/deckhand-src.sources <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -qq >&2
  fi
  local v
  v=$(apt-cache showsrc kubernetes | awk '/^Version:/ {print $2; exit}')
  [ -n "$v" ] || die "no source package 'kubernetes' found"
  echo "$v"
}
