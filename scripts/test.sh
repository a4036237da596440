#!/usr/bin/env bash
# The test command: installs what is missing, builds everything (warnings as errors), and runs
# every test: unit, integration (real daemon and CLI processes over real sockets), GPU (which
# skip cleanly where no GPU is visible) and Python (pytest through ctest, label python: the
# icecache package against a real daemon, transformers on the real model). Exit status 0 only
# when all pass.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${ICECACHE_BUILD_DIR:-$root/build}"

# The Python side: the cached virtual environment (scripts/python_env.sh; its first install
# downloads torch's wheels), the real model and the Bible text its tests read.
"$root/scripts/bootstrap.sh" --model
venv="$("$root/scripts/python_env.sh")"
ICECACHE_MODEL="$("$root/scripts/fetch_model.sh")"
export ICECACHE_MODEL
"$root/scripts/build.sh" -DPython_EXECUTABLE="$venv/bin/python"
ctest --test-dir "$build" --output-on-failure -j "$(nproc)" --timeout 300
