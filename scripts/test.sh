#!/usr/bin/env bash
# The test command: installs what is missing, builds everything (warnings as errors), and runs
# every test: unit, integration (real daemon and CLI processes over real sockets) and GPU
# (which skip cleanly where no GPU is visible). Exit status 0 only when all pass.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${ICECACHE_BUILD_DIR:-$root/build}"

"$root/scripts/build.sh"
ctest --test-dir "$build" --output-on-failure -j "$(nproc)" --timeout 300
