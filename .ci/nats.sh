#!/usr/bin/env bash
# `task nats:start` / `task nats:stop`: a local nats-server with JetStream under ./.data,
# started only when nothing answers at NATS_URL. nats-server comes from the tool cache
# (tools.sh nats installs it), else from PATH.
set -euo pipefail
. "$(dirname "$0")/env.sh"
cmd="${1:-start}"
url="${NATS_URL:-nats://localhost:4222}"
hostport="${url#*://}"; hostport="${hostport##*@}"; hostport="${hostport%%/*}"
host="${hostport%:*}"; port="${hostport##*:}"
[ "$host" = "$hostport" ] && port=4222
answers() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
case "$cmd" in
  start)
    if answers "$host" "$port"; then
      echo "nats-server already answers at $host:$port"
      exit 0
    fi
    server="$KLOUDMETER_CACHE/venv/bin/nats-server"
    [ -x "$server" ] || server=$(command -v nats-server) || { echo "nats-server not found: run bash .ci/tools.sh nats" >&2; exit 1; }
    mkdir -p .data
    nohup "$server" -js -a 127.0.0.1 -p "$port" -sd .data/nats > .data/nats.log 2>&1 &
    echo $! > .data/nats.pid
    for _ in $(seq 1 100); do answers 127.0.0.1 "$port" && break; sleep 0.1; done
    answers 127.0.0.1 "$port" || { echo "nats-server did not start; see .data/nats.log" >&2; exit 1; }
    echo "nats-server started on 127.0.0.1:$port (pid $(cat .data/nats.pid), data in .data/nats)"
    ;;
  stop)
    if [ -f .data/nats.pid ]; then
      kill "$(cat .data/nats.pid)" 2>/dev/null || true
      rm -f .data/nats.pid
      echo "nats-server stopped"
    fi
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
