# Sourced by every script here (and `.ci/with-tools`): where the tool cache is and how
# its tools are found. Task lets a variable already in the environment win over its own
# `env:` (PATH always is), so the cache is put on PATH here, not in the Taskfile.
KLOUDMETER_CACHE="${KLOUDMETER_CACHE:-$HOME/.cache/kloudmeter}"
export KLOUDMETER_CACHE
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$KLOUDMETER_CACHE/target}"
export PATH="$KLOUDMETER_CACHE/venv/bin:$KLOUDMETER_CACHE/bin:$PATH"
