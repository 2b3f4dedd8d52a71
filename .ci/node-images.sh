#!/usr/bin/env bash
# The images the real-node harness (.ci/node.sh) loads into its containerd, made without a
# registry: each is assembled from scratch with buildah (as .ci/image.sh makes the product
# image) and saved as a docker-archive tar in $KLOUDMETER_CACHE/node/images, which
# `ctr images import` loads.
#   localhost/kloudmeter:<version>  the release binary (.ci/image.sh builds it)
#   localhost/nats:<version>        the nats-server the tests run (.ci/tools.sh)
#   localhost/pause:km              the pod sandbox: a static C pause() loop
#   localhost/km-client:1           sh and curl (and the libraries they link), for client pods
# Prints the images folder on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/env.sh
OUT="$KLOUDMETER_CACHE/node/images"
mkdir -p "$OUT"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
B="$SUDO buildah --storage-driver vfs"
log() { echo "node-images: $*" >&2; }

# scratch_image <ref> <tar> <entrypoint json> <file>[:<path in the image>]...: the files
# (and every library they link, at its own path), plus /tmp, as user 65532, saved as <tar>.
scratch_image() {
  local ref=$1 tar=$2 entrypoint=$3; shift 3
  local ctr mnt f src dest lib
  ctr=$($B from scratch)
  mnt=$($B mount "$ctr")
  for f in "$@"; do
    src=${f%%:*}; dest=${f#*:}
    $SUDO install -D -m 0755 "$src" "$mnt$dest"
    for lib in $(ldd "$src" 2>/dev/null | awk '/=>/ {print $3} $1 ~ /^\// {print $1}'); do
      $SUDO install -D -m 0755 "$lib" "$mnt$lib"
    done
  done
  $SUDO install -d -m 1777 "$mnt/tmp"
  $B umount "$ctr" >/dev/null
  $B config --user 65532:65532 --entrypoint "$entrypoint" "$ctr"
  $B commit --quiet --rm "$ctr" "$ref" >/dev/null
  save "$ref" "$tar"
}

# save <ref> <tar>: the image as a docker-archive tar, written whole or not at all
save() {
  rm -f "$2"
  $B push --quiet "$1" "docker-archive:$2.part:$1" >/dev/null
  mv "$2.part" "$2"
  log "$1 -> $2"
}

version=$(grep -m1 '^version' Cargo.toml | cut -d'"' -f2)
nats_version=$(grep -m1 '^NATS_VERSION=' .ci/tools.sh | cut -d= -f2)

# the product image: rebuilt every time (the binary changes), as .ci/image.sh checks it
bash .ci/image.sh >&2
save "localhost/kloudmeter:$version" "$OUT/kloudmeter.tar"

if [ ! -s "$OUT/nats-$nats_version.tar" ]; then
  bash .ci/tools.sh nats >&2
  scratch_image "localhost/nats:$nats_version" "$OUT/nats-$nats_version.tar" \
    '["/usr/local/bin/nats-server"]' "$(command -v nats-server):/usr/local/bin/nats-server"
fi

if [ ! -s "$OUT/pause.tar" ]; then
  src=$(mktemp -d)
  cat >"$src/pause.c" <<'C'
/* The pod sandbox's only process: sleeps until a signal ends it. */
#include <signal.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
int main(void) {
  signal(SIGINT, stop);
  signal(SIGTERM, stop);
  for (;;) pause();
}
C
  gcc -static -O2 -o "$src/pause" "$src/pause.c"
  scratch_image localhost/pause:km "$OUT/pause.tar" '["/pause"]' "$src/pause:/pause"
  rm -rf "$src"
fi

if [ ! -s "$OUT/km-client.tar" ]; then
  command -v curl >/dev/null || { log "curl is needed for the client image"; exit 1; }
  scratch_image localhost/km-client:1 "$OUT/km-client.tar" '["/bin/sh"]' \
    /bin/sh:/bin/sh "$(command -v curl):/usr/bin/curl" /bin/sleep:/bin/sleep /bin/cat:/bin/cat
fi
echo "$OUT"
