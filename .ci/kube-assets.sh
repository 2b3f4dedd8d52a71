#!/usr/bin/env bash
# Provides a real control plane for the operator tests: etcd and kube-apiserver (and
# kube-controller-manager) in one folder, as envtest's KUBEBUILDER_ASSETS expects.
# - KUBEBUILDER_ASSETS set: used as it is (bring your own binaries).
# - otherwise: built once from Debian bookworm's kubernetes source package (v1.20.2, Go
#   dependencies vendored) with Debian's Go, and cached in $KLOUDMETER_CACHE/kube.
# Prints the assets folder on its last line.
set -euo pipefail
CACHE="${KLOUDMETER_CACHE:-$HOME/.cache/kloudmeter}"
OUT="$CACHE/kube"
if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
  for b in etcd kube-apiserver; do
    [ -x "$KUBEBUILDER_ASSETS/$b" ] || { echo "kube-assets: $KUBEBUILDER_ASSETS/$b is missing" >&2; exit 1; }
  done
  echo "$KUBEBUILDER_ASSETS"; exit 0
fi
if [ -x "$OUT/kube-apiserver" ] && [ -x "$OUT/kube-controller-manager" ] && [ -x "$OUT/etcd" ]; then
  echo "$OUT"; exit 0
fi
log() { echo "kube-assets: $*" >&2; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
pkgs="golang-go golang-github-modern-go-reflect2-dev etcd-server make rsync dpkg-dev"
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
# Source entries derived from the machine's own binary entries.
if ! grep -rqs '^Types: deb-src\|^deb-src ' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources | $SUDO tee /etc/apt/sources.list.d/kloudmeter-src.sources >/dev/null
  else
    grep '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' | $SUDO tee /etc/apt/sources.list.d/kloudmeter-src.list >/dev/null
  fi
  missing="$missing update-only"
fi
if [ -n "$missing" ]; then
  log "installing:$missing"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null
fi
SRC="$CACHE/kube-src"
mkdir -p "$SRC" "$OUT"
cd "$SRC"
dir=$(find . -maxdepth 1 -type d -name 'kubernetes-1.20*' | head -1)
if [ -z "$dir" ]; then
  log "fetching the kubernetes source package"
  apt-get source -qq kubernetes >/dev/null 2>&1 || apt-get source kubernetes
  dir=$(find . -maxdepth 1 -type d -name 'kubernetes-1.20*' | head -1)
fi
cd "$dir"
# The vendored reflect2 v1.0.1 crashes under Go 1.19; Debian's packaged one works.
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
log "building kube-apiserver and kube-controller-manager (a few minutes, once)"
GO111MODULE=off KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_TREE_STATE=clean \
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >"$SRC/build.log" 2>&1 || { tail -30 "$SRC/build.log" >&2; exit 1; }
cp _output/bin/kube-apiserver _output/bin/kube-controller-manager "$OUT/"
cp "$(command -v etcd || echo /usr/bin/etcd)" "$OUT/etcd"
log "assets ready in $OUT"
echo "$OUT"
