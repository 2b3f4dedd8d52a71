#!/usr/bin/env bash
# The README's quick start as a new user meets it: `task run` from a fresh, empty tool
# cache with no nats-server on PATH, then the README's curl examples, in order, against
# that instance (.ci/readme-examples.py checks every answer the README shows). Only
# cargo's build folder is shared with the rest of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/env.sh
main_cache="$KLOUDMETER_CACHE"
fresh=$(mktemp -d)
bin=$(mktemp -d)
log="$fresh/task-run.log"
# PATH as a newcomer has it: the system's, minus any folder holding a nats-server, plus
# Task (the README's one prerequisite besides Rust and Python)
path="$bin"
IFS=: read -ra dirs <<<"$PATH"
for d in "${dirs[@]}"; do
  [ -n "$d" ] && [ ! -e "$d/nats-server" ] && path="$path:$d"
done
ln -s "$main_cache/venv/bin/task" "$bin/task"
pid=""
cleanup() {
  [ -n "$pid" ] && kill -- "-$pid" 2>/dev/null || true
  KLOUDMETER_CACHE="$fresh" bash .ci/nats.sh stop >/dev/null 2>&1 || true
  rm -rf "$fresh" "$bin" .data
}
trap cleanup EXIT
rm -rf .data
echo "newcomer: task run with an empty tool cache ($fresh) and no nats-server on PATH"
start=$(date +%s)
setsid env PATH="$path" KLOUDMETER_CACHE="$fresh" task run >"$log" 2>&1 </dev/null &
pid=$!
until curl -fsS localhost:8080/readyz >/dev/null 2>&1; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "newcomer: task run exited before kloudmeter was ready:" >&2; tail -40 "$log" >&2; exit 1
  fi
  if [ $(( $(date +%s) - start )) -gt 1200 ]; then
    echo "newcomer: kloudmeter not ready after 20 minutes:" >&2; tail -40 "$log" >&2; exit 1
  fi
  sleep 1
done
echo "newcomer: /readyz answered 200 after $(( $(date +%s) - start )) s"
if [ -e "$fresh/kube" ] || [ -e "$fresh/kube-src" ]; then
  echo "newcomer: task run built Kubernetes assets it does not need" >&2; exit 1
fi
"$main_cache/venv/bin/python" .ci/readme-examples.py http://localhost:8080 README.md
