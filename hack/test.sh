#!/usr/bin/env bash
# Runs every Deckhand test on this machine, from nothing: installs what is missing, builds,
# checks formatting and lints, starts the test bed, runs all tests (unit, integration, end-to-end,
# root-only ones included), tears the test bed down and checks that nothing was left on the host.
# .ci/run calls exactly this.
#
# Extra arguments go to `cargo test` (e.g. `hack/test.sh -p deckhand-cni`).
# DH_TESTBED_ENV=path/testbed.env reuses a running test bed (started by `hack/testbed.sh up`)
# and leaves it running; otherwise a fresh one is started and always removed.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"
need_root
cd "$DH_ROOT"

"$DH_ROOT/hack/install-deps.sh"
log "kube binaries: $("$DH_ROOT/hack/build-kube.sh")"

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "building tests"
cargo test --workspace --locked --no-run
cargo build --workspace --locked --bins

own_testbed=0
if [ -z "${DH_TESTBED_ENV:-}" ]; then
  own_testbed=1
  DIR=${DH_TESTBED_DIR:-/tmp/dh-testbed-test}
  cleanup() {
    rc=$?
    log "tearing the test bed down"
    "$DH_ROOT/hack/testbed.sh" down "$DIR" || rc=1
    exit "$rc"
  }
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  DH_TESTIMAGES_BIN="$DH_ROOT/target/debug/dh-testimages" "$DH_ROOT/hack/testbed.sh" up "$DIR"
  export DH_TESTBED_ENV="$DIR/testbed.env"
fi

log "running the tests"
cargo test --workspace --locked "$@"

if [ "$own_testbed" = 1 ]; then
  trap - EXIT
  log "tearing the test bed down"
  "$DH_ROOT/hack/testbed.sh" down "$DIR"
  leak_check="$DH_ROOT/../shared/tools/leak-check"
  if [ -x "$leak_check" ]; then
    # Our own ancestors may carry the checkout's path in their command line: not leftovers.
    if left=$("$leak_check" 2>&1 | grep -vE "^process ($$|$PPID):"); then
      printf '%s\n' "$left" >&2
      die "the tests left the above on this host"
    fi
    log "leak-check: clean"
  fi
fi
log "all tests passed"
