#!/usr/bin/env bash
# A CRD server that enforces CEL validation rules (`x-kubernetes-validations`), for the
# test that the Meter CRD's rules refuse bad Meters: the 1.20 kube-apiserver the other
# tests run drops those rules without a word. No full kube-apiserver newer than 1.20 is
# packaged, but `apiextensions-apiserver` (the CRD server kube-apiserver embeds) is, as Go
# source, in Debian sid: golang-k8s-apiextensions-apiserver-dev and its golang-*-dev
# dependencies, built with sid's Go.
# - CEL_APISERVER_BIN set: used as it is (bring your own apiextensions-apiserver).
# - otherwise: built once into $KLOUDMETER_CACHE/cel/apiextensions-apiserver. The packages
#   are downloaded with a private apt configuration under $KLOUDMETER_CACHE/cel/apt and
#   unpacked with dpkg-deb into one folder there: nothing is installed and /etc/apt is not
#   touched. About 1 minute to download and unpack (~375 MB), 4-7 minutes to build.
# sid moves: the version verified is pinned, and a sid without it fails with that said.
# Prints the binary's path on its last line.
set -euo pipefail
. "$(dirname "$0")/env.sh"
VERSION=0.36.4-1     # golang-k8s-apiextensions-apiserver-dev, i.e. Kubernetes v1.36.4
GO=golang-1.26-go
DIR="$KLOUDMETER_CACHE/cel"
BIN="$DIR/apiextensions-apiserver"
log() { echo "cel-assets: $*" >&2; }
if [ -n "${CEL_APISERVER_BIN:-}" ]; then
  [ -x "$CEL_APISERVER_BIN" ] || { log "CEL_APISERVER_BIN=$CEL_APISERVER_BIN is not an executable"; exit 1; }
  echo "$CEL_APISERVER_BIN"; exit 0
fi
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
log "the CEL rules test needs apiextensions-apiserver v1.36; building it once (set CEL_APISERVER_BIN to skip)"
APT="$DIR/apt"
mkdir -p "$APT/etc" "$APT/lists/partial" "$APT/cache/archives/partial"
cat >"$APT/etc/sid.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
: >"$APT/etc/sources.list"
# an empty package status: apt fetches the whole dependency closure, as for a new root
: >"$APT/status"
aptq=(-o "Dir::Etc::SourceList=$APT/etc/sources.list" -o "Dir::Etc::SourceParts=$APT/etc"
      -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o "Dir::State::Status=$APT/status"
      -o Debug::NoLocking=1)
[ "$(id -u)" = 0 ] && aptq+=(-o APT::Sandbox::User=root)
start=$(date +%s)
apt-get "${aptq[@]}" update -qq
have=$(apt-cache "${aptq[@]}" show --no-all-versions golang-k8s-apiextensions-apiserver-dev 2>/dev/null | awk '/^Version:/ {print $2}')
if [ "$have" != "$VERSION" ]; then
  log "Debian sid has golang-k8s-apiextensions-apiserver-dev ${have:-nowhere}, not the $VERSION this was verified with;"
  log "update VERSION in $0 after checking the CEL test against it, or set CEL_APISERVER_BIN"
  exit 1
fi
apt-get "${aptq[@]}" install --download-only -y -qq --no-install-recommends \
  "golang-k8s-apiextensions-apiserver-dev=$VERSION" "$GO" >/dev/null
ROOT="$DIR/root"
rm -rf "$ROOT"; mkdir -p "$ROOT"
for deb in "$APT"/cache/archives/golang-*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
log "downloaded and unpacked in $(( $(date +%s) - start )) s; building (4-7 minutes; log in $DIR/build.log)"
goroot=$(cd "$ROOT/usr/lib" && ls -d go-1.* | tail -1)
# GOPATH mode over the unpacked /usr/share/gocode, as Debian builds its Go packages
(cd "$ROOT/usr/share/gocode/src/k8s.io/apiextensions-apiserver" &&
  GOROOT="$ROOT/usr/lib/$goroot" GOPATH="$ROOT/usr/share/gocode" GO111MODULE=off \
  GOCACHE="$DIR/gocache" CGO_ENABLED=0 GOTOOLCHAIN=local \
  "$ROOT/usr/lib/$goroot/bin/go" build -ldflags "-s -w" -o "$BIN.part" . ) >"$DIR/build.log" 2>&1 ||
  { tail -30 "$DIR/build.log" >&2; exit 1; }
mv "$BIN.part" "$BIN"
# the sources are not needed once built
rm -rf "$ROOT" "$DIR/gocache" "$APT/cache/archives"
log "built $BIN in $(( $(date +%s) - start )) s"
echo "$BIN"
