#!/usr/bin/env bash
# Benchmarks image pull + unpack: deckhand-cri (release build, through its CRI ImageService)
# against the test bed's containerd 1.6 (`ctr images pull --plain-http`, which also unpacks into
# the overlayfs snapshotter), in the same run, on the same multi-layer image in the test bed's
# local registry.
#
# The image (dh/bench:latest) is built here, reproducibly, from pseudo-random data with fixed
# seeds (openssl AES-CTR keystreams): LAYERS gzip layers, each with FILES incompressible 16 KiB
# files and FILES base64 text files (~21 KiB, compressible), tarred with fixed mtimes and owners,
# so every run pushes the same digests. Each run starts from an empty store: a fresh deckhand
# root (daemon restarted, outside the timing), and for containerd the image removed with a
# synchronous GC of its content and snapshots. Runs alternate which goes first.
#
# Prints the median and min wall time of N pulls per side, the peak memory (daemon VmHWM, reset
# before each pull through /proc/PID/clear_refs, plus the client's max RSS) and the ratios.
# Removes everything it creates, also when interrupted.
#
#   hack/bench/images.sh [N]     (default 7; needs the test bed: hack/testbed.sh up)
#   LAYERS=4 FILES=100 hack/bench/images.sh
#   DH_BENCH_LOG=deckhand_cri=debug hack/bench/images.sh 3   (daemon log kept in
#                                    /tmp/dh-bench-images-daemon.log)
set -euo pipefail

N=${1:-7}
LAYERS=${LAYERS:-4}
FILES=${FILES:-100}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
[ "$(id -u)" = 0 ] || { echo "images.sh: run as root" >&2; exit 1; }
ENV_FILE=${DH_TESTBED_ENV:-/tmp/dh-testbed/testbed.env}
[ -f "$ENV_FILE" ] || { echo "images.sh: no test bed ($ENV_FILE); start it with hack/testbed.sh up" >&2; exit 1; }
# shellcheck disable=SC1090
. "$ENV_FILE"
REG=${DH_REGISTRY:?}
SOCK=${DH_CONTAINERD_SOCKET:?}
for t in openssl curl ctr /usr/bin/time sha256sum; do
  command -v "$t" >/dev/null || { echo "images.sh: $t missing" >&2; exit 1; }
done

echo "building release binaries..." >&2
(cd "$ROOT" && cargo build --release -q -p deckhand-cri --bin deckhand-cri --bin deckhand-cri-pull)
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
BIN=${TARGET_DIR:-$ROOT/target}/release

WORK=$(mktemp -d /tmp/dh-bench-images.XXXXXX)
NS=dh-bench
REPO=dh/bench
IMAGE=$REG/$REPO:latest
DAEMON_PID=
MANIFEST_DIGEST=

stop_daemon() {
  if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.05; done
    kill -KILL "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
  fi
  DAEMON_PID=
}

ctr_clean() {
  ctr --address "$SOCK" -n $NS images rm --sync "$IMAGE" >/dev/null 2>&1 || true
  local c
  for c in $(ctr --address "$SOCK" -n $NS content ls -q 2>/dev/null); do
    ctr --address "$SOCK" -n $NS content rm "$c" >/dev/null 2>&1 || true
  done
}

cleanup() {
  set +e
  stop_daemon
  ctr_clean
  ctr --address "$SOCK" namespaces rm $NS >/dev/null 2>&1
  [ -n "$MANIFEST_DIGEST" ] && curl -sf -X DELETE "http://$REG/v2/$REPO/manifests/$MANIFEST_DIGEST" >/dev/null
  [ -n "${DH_BENCH_LOG:-}" ] && cp "$WORK/daemon.log" /tmp/dh-bench-images-daemon.log
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# ---- build and push the image ----------------------------------------------------------------
keystream() { # SEED BYTES
  # openssl dies of SIGPIPE when head has enough: not an error.
  { openssl enc -aes-256-ctr -pbkdf2 -nosalt -pass "pass:dh-bench-$1" -in /dev/zero 2>/dev/null || true; } |
    head -c "$2"
}

push_blob() { # FILE DIGEST
  if curl -sf -o /dev/null -I "http://$REG/v2/$REPO/blobs/$2"; then return 0; fi
  local loc
  loc=$(curl -sf -D - -o /dev/null -X POST "http://$REG/v2/$REPO/blobs/uploads/" |
    tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
  case "$loc" in http*) ;; *) loc="http://$REG$loc" ;; esac
  case "$loc" in *\?*) loc="$loc&digest=$2" ;; *) loc="$loc?digest=$2" ;; esac
  curl -sf -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$1" "$loc"
}

echo "building $REPO: $LAYERS layers x $((FILES * 2)) files..." >&2
layers_json=
diff_ids=
total=0
for l in $(seq 1 "$LAYERS"); do
  d=$WORK/layer$l
  mkdir -p "$d/data$l/bin" "$d/data$l/text"
  keystream "r$l" $((FILES * 16384)) >"$WORK/rand"
  split -a 3 -d -b 16384 "$WORK/rand" "$d/data$l/bin/r"
  keystream "t$l" $((FILES * 16384)) | base64 -w 76 >"$WORK/text"
  split -a 3 -d -n "$FILES" "$WORK/text" "$d/data$l/text/t"
  ln -s "bin/r000" "$d/data$l/first"
  rm -f "$WORK/rand" "$WORK/text"
  chmod -R u=rwX,go=rX "$d"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$d" -cf "$WORK/layer$l.tar" .
  gzip -n -6 -c "$WORK/layer$l.tar" >"$WORK/layer$l.tar.gz"
  diff_id=sha256:$(sha256sum "$WORK/layer$l.tar" | cut -d' ' -f1)
  digest=sha256:$(sha256sum "$WORK/layer$l.tar.gz" | cut -d' ' -f1)
  size=$(stat -c %s "$WORK/layer$l.tar.gz")
  total=$((total + size))
  push_blob "$WORK/layer$l.tar.gz" "$digest"
  layers_json="$layers_json${layers_json:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"$digest\",\"size\":$size}"
  diff_ids="$diff_ids${diff_ids:+,}\"$diff_id\""
  rm -rf "$d" "$WORK/layer$l.tar"
done
printf '{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":[%s]}}' \
  "$diff_ids" >"$WORK/config.json"
cdigest=sha256:$(sha256sum "$WORK/config.json" | cut -d' ' -f1)
push_blob "$WORK/config.json" "$cdigest"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[%s]}' \
  "$cdigest" "$(stat -c %s "$WORK/config.json")" "$layers_json" >"$WORK/manifest.json"
curl -sf -o /dev/null -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
  --data-binary "@$WORK/manifest.json" "http://$REG/v2/$REPO/manifests/latest"
MANIFEST_DIGEST=sha256:$(sha256sum "$WORK/manifest.json" | cut -d' ' -f1)
echo "pushed $IMAGE ($LAYERS layers, $((total / 1024)) KiB compressed)" >&2

# ---- the runs --------------------------------------------------------------------------------
now_us() { local t=${EPOCHREALTIME/./}; echo "$t"; }
hwm_kib() { sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status"; }

CONTAINERD_PID=$(ss -Hxlp 2>/dev/null | grep -F "$SOCK " | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -n1)
[ -n "$CONTAINERD_PID" ] || { echo "images.sh: cannot find containerd's pid for $SOCK" >&2; exit 1; }

run_ours() { # I -> appends "us rss_kib" to $WORK/ours
  local root=$WORK/dh-root-$1 sock=$WORK/dh-cri-$1.sock t0 t1 client daemon
  "$BIN/deckhand-cri" --config /dev/null --socket "$sock" --root "$root" --state-dir "$WORK/state" \
    --log-level "${DH_BENCH_LOG:-warn}" 2>>"$WORK/daemon.log" &
  DAEMON_PID=$!
  for _ in $(seq 1 200); do [ -S "$sock" ] && break; sleep 0.02; done
  [ -S "$sock" ] || { echo "images.sh: deckhand-cri did not start: $(tail -5 "$WORK/daemon.log")" >&2; exit 1; }
  echo 5 >"/proc/$DAEMON_PID/clear_refs"
  t0=$(now_us)
  /usr/bin/time -f '%M' -o "$WORK/time" "$BIN/deckhand-cri-pull" --endpoint "$sock" "$IMAGE" >/dev/null
  t1=$(now_us)
  client=$(cat "$WORK/time")
  daemon=$(hwm_kib "$DAEMON_PID")
  echo "$((t1 - t0)) $((client + daemon)) $daemon" >>"$WORK/ours"
  stop_daemon
  rm -rf "$root"
}

run_ctr() { # I -> appends "us rss_kib" to $WORK/ctr
  local t0 t1 client daemon
  ctr_clean
  echo 5 >"/proc/$CONTAINERD_PID/clear_refs"
  t0=$(now_us)
  /usr/bin/time -f '%M' -o "$WORK/time" ctr --address "$SOCK" -n $NS images pull --plain-http "$IMAGE" >/dev/null
  t1=$(now_us)
  client=$(cat "$WORK/time")
  daemon=$(hwm_kib "$CONTAINERD_PID")
  echo "$((t1 - t0)) $((client + daemon)) $daemon" >>"$WORK/ctr"
  ctr_clean
}

: >"$WORK/ours"
: >"$WORK/ctr"
# One warm-up each (page cache of the registry's blobs, binaries).
run_ours 0 && run_ctr 0
: >"$WORK/ours"
: >"$WORK/ctr"
for i in $(seq 1 "$N"); do
  if [ $((i % 2)) = 1 ]; then run_ours "$i"; run_ctr "$i"; else run_ctr "$i"; run_ours "$i"; fi
  echo "run $i/$N done" >&2
done

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2))}'; }
col() { awk -v c="$2" '{print $c}' "$WORK/$1"; }
o_med=$(col ours 1 | median); c_med=$(col ctr 1 | median)
o_min=$(col ours 1 | sort -n | head -n1); c_min=$(col ctr 1 | sort -n | head -n1)
o_mem=$(col ours 2 | sort -n | tail -n1); c_mem=$(col ctr 2 | sort -n | tail -n1)
o_dmem=$(col ours 3 | sort -n | tail -n1); c_dmem=$(col ctr 3 | sort -n | tail -n1)

echo
echo "pull + unpack of $IMAGE ($LAYERS layers, $((total / 1024)) KiB compressed), N=$N"
printf '%-22s %12s %12s %16s %18s\n' "" "median ms" "min ms" "peak MiB (all)" "peak MiB (daemon)"
printf '%-22s %12.1f %12.1f %16.1f %18.1f\n' "deckhand-cri" "$(echo "$o_med/1000" | bc -l)" \
  "$(echo "$o_min/1000" | bc -l)" "$(echo "$o_mem/1024" | bc -l)" "$(echo "$o_dmem/1024" | bc -l)"
printf '%-22s %12.1f %12.1f %16.1f %18.1f\n' "containerd 1.6 + ctr" "$(echo "$c_med/1000" | bc -l)" \
  "$(echo "$c_min/1000" | bc -l)" "$(echo "$c_mem/1024" | bc -l)" "$(echo "$c_dmem/1024" | bc -l)"
printf 'ratio deckhand/containerd: time %.2fx (median), peak memory %.2fx (all), %.2fx (daemon)\n' \
  "$(echo "$o_med/$c_med" | bc -l)" "$(echo "$o_mem/$c_mem" | bc -l)" "$(echo "$o_dmem/$c_dmem" | bc -l)"
