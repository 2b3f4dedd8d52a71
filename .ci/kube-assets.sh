#!/usr/bin/env bash
# Provides a real control plane for the operator tests: etcd and kube-apiserver (and
# kube-controller-manager) in one folder, as envtest's KUBEBUILDER_ASSETS expects.
#   kube-assets.sh        the control plane (operator tests)
#   kube-assets.sh node   the node binaries too: kube-scheduler, kubelet, kube-proxy (the
#                         real-node harness, .ci/node.sh; about 4 more minutes, once)
# - KUBEBUILDER_ASSETS set: used as it is (bring your own binaries).
# - otherwise: built once from Debian bookworm's kubernetes source package (v1.20.2, Go
#   dependencies vendored) with Debian's Go, and cached in $KLOUDMETER_CACHE/kube.
# The source is fetched with apt's configuration pointed into the cache (a private
# deb-src list and package lists), so no apt source is added to the system; the Debian
# packages the build needs (Go, etcd) are the only system change, and are announced.
# Prints the assets folder on its last line.
set -euo pipefail
. "$(dirname "$0")/env.sh"
CACHE="$KLOUDMETER_CACHE"
OUT="$CACHE/kube"
want="${1:-control-plane}"
bins="etcd kube-apiserver kube-controller-manager"
[ "$want" = node ] && bins="$bins kube-scheduler kubelet kube-proxy"
# only what the cache lacks (a control plane built before keeps its binaries)
make_what=""
for b in $bins; do
  [ "$b" = etcd ] || [ -x "$OUT/$b" ] || make_what="$make_what cmd/$b"
done
log() { echo "kube-assets: $*" >&2; }
have_all() { for b in $bins; do [ -x "$1/$b" ] || return 1; done; }
if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
  [ "$want" = node ] || bins="etcd kube-apiserver"
  for b in $bins; do
    [ -x "$KUBEBUILDER_ASSETS/$b" ] || { log "$KUBEBUILDER_ASSETS/$b is missing"; exit 1; }
  done
  echo "$KUBEBUILDER_ASSETS"; exit 0
fi
if have_all "$OUT"; then
  echo "$OUT"; exit 0
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
pkgs="golang-go golang-github-modern-go-reflect2-dev etcd-server make rsync dpkg-dev"
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
SRC="$CACHE/kube-src"
log "the operator tests need etcd and kube-apiserver; building them once (set KUBEBUILDER_ASSETS to skip):"
log "  - downloads Debian's kubernetes 1.20.2 source package (~2.2 GB with its vendored"
log "    dependencies) into $SRC and compiles kube-apiserver and kube-controller-manager:"
log "    about 6 minutes on 2 cores, ~6 GB of disk in the cache (the source can be deleted after)"
if [ -n "$missing" ]; then
  log "  - installs Debian packages (system-wide, with apt-get):$missing"
fi
log "  - fetches the source with apt pointed at $CACHE/apt (no change to /etc/apt)"
if [ -n "$missing" ]; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
mkdir -p "$SRC" "$OUT"
dir=$(cd "$SRC" && find . -maxdepth 1 -type d -name 'kubernetes-1.20*' | head -1)
if [ -z "$dir" ]; then
  # A private apt configuration with deb-src entries derived from the system's Debian
  # entries: its own source list, package lists and cache, all under $CACHE/apt.
  APT="$CACHE/apt"
  mkdir -p "$APT/sources.list.d" "$APT/lists/partial" "$APT/cache/archives/partial"
  : > "$APT/sources.list"
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > "$APT/sources.list.d/debian-src.sources"
  else
    grep -h '^deb .*debian' /etc/apt/sources.list | sed 's/^deb /deb-src /' > "$APT/sources.list"
  fi
  aptq=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=$APT/sources.list.d"
        -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache")
  # the cache belongs to the user running this, whom apt's download sandbox (_apt) may not reach
  [ "$(id -u)" = 0 ] && aptq+=(-o APT::Sandbox::User=root)
  log "fetching the kubernetes source package"
  apt-get "${aptq[@]}" update -qq
  (cd "$SRC" && apt-get "${aptq[@]}" source -qq kubernetes >/dev/null)
  dir=$(cd "$SRC" && find . -maxdepth 1 -type d -name 'kubernetes-1.20*' | head -1)
  [ -n "$dir" ] || { log "the kubernetes source package did not unpack in $SRC"; exit 1; }
  rm -f "$SRC"/*.tar.* "$SRC"/*.dsc
fi
cd "$SRC/$dir"
# The vendored reflect2 v1.0.1 crashes under Go 1.19; Debian's packaged one works.
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
log "building $make_what (about 6 minutes for the control plane, 4 more for the node; once; log in $SRC/build.log)"
start=$(date +%s)
# make skips what is already built; stripped (-s -w): the node binaries are ~430 MB otherwise
GO111MODULE=off CGO_ENABLED=0 KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_TREE_STATE=clean GOLDFLAGS="-s -w" \
  make WHAT="$make_what" >"$SRC/build.log" 2>&1 || { tail -30 "$SRC/build.log" >&2; exit 1; }
for c in $make_what; do cp "_output/bin/${c#cmd/}" "$OUT/"; done
cp "$(command -v etcd || echo /usr/bin/etcd)" "$OUT/etcd"
log "assets ready in $OUT (built in $(( $(date +%s) - start )) s)"
echo "$OUT"
