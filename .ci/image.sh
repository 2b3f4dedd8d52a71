#!/usr/bin/env bash
# Builds the container image without a registry: the release binary and exactly the
# shared libraries it links, in an image assembled from scratch with buildah (Debian's
# package; vfs storage, no daemon). Verifies that the files are complete by running the
# binary inside the image's root as the non-root user, then checks the image config.
# The Dockerfile in this folder builds the equivalent image where a registry is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/env.sh
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if ! command -v buildah >/dev/null; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah >/dev/null
fi
cargo build --release --locked --bin kloudmeter
bin="$CARGO_TARGET_DIR/release/kloudmeter"
version=$(grep -m1 '^version' Cargo.toml | cut -d'"' -f2)
B="buildah --storage-driver vfs"
ctr=$($SUDO $B from scratch)
trap '$SUDO $B rm "$ctr" >/dev/null 2>&1 || true' EXIT
mnt=$($SUDO $B mount "$ctr")
$SUDO install -D -m 0755 "$bin" "$mnt/usr/local/bin/kloudmeter"
$SUDO strip "$mnt/usr/local/bin/kloudmeter"
for lib in $(ldd "$bin" | awk '/=>/ {print $3} $1 ~ /^\// {print $1}'); do
  $SUDO install -D -m 0755 "$lib" "$mnt$lib"
done
$SUDO install -d -m 1777 "$mnt/tmp"
# the image's own files, as the image's user: proves nothing is missing
got=$($SUDO chroot --userspec=65532:65532 "$mnt" /usr/local/bin/kloudmeter --version)
[ "$got" = "kloudmeter $version" ] || { echo "image: binary in the image answered: $got" >&2; exit 1; }
$SUDO chroot --userspec=65532:65532 "$mnt" /usr/local/bin/kloudmeter crd | diff -q - crds/meters.kloudmeter.io.yaml
$SUDO $B umount "$ctr" >/dev/null
$SUDO $B config --user 65532:65532 --port 8080 --entrypoint '["/usr/local/bin/kloudmeter"]' --cmd run \
  --label org.opencontainers.image.title=kloudmeter --label "org.opencontainers.image.version=$version" "$ctr"
$SUDO $B commit --quiet "$ctr" "localhost/kloudmeter:$version" >/dev/null
user=$($SUDO $B inspect --type image --format '{{.OCIv1.Config.User}}' "localhost/kloudmeter:$version")
[ "$user" = "65532:65532" ] || { echo "image: user is $user" >&2; exit 1; }
size=$($SUDO $B images --format '{{.Size}}' "localhost/kloudmeter:$version")
echo "image: localhost/kloudmeter:$version built from scratch ($size), runs as 65532:65532"
