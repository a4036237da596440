#!/usr/bin/env bash
# Checks that every C++ and CUDA source of the repository is formatted by .clang-format
# (Google style, 100 columns) with Debian 12's clang-format 14. Prints the offending files
# and exits 1 when one is not; `scripts/check_format.sh --fix` formats them in place.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
fix=false
[[ "${1:-}" == "--fix" ]] && fix=true
if ! command -v clang-format >/dev/null 2>&1; then
  echo "check_format: clang-format is not installed (scripts/bootstrap.sh installs it)" >&2
  exit 2
fi
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  mapfile -t files < <(git ls-files -co --exclude-standard -- '*.cc' '*.h' '*.cu' '*.cuh')
else
  mapfile -t files < <(find . -path ./build -prune -o -path './build-*' -prune -o \
                         \( -name '*.cc' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) \
                         -type f -print)
fi
existing=()
for f in "${files[@]}"; do [[ -f "$f" ]] && existing+=("$f"); done
if $fix; then
  clang-format -i "${existing[@]}"
  exit 0
fi
bad=()
for f in "${existing[@]}"; do
  if ! clang-format --dry-run --Werror "$f" >/dev/null 2>&1; then bad+=("$f"); fi
done
if ((${#bad[@]} > 0)); then
  printf 'check_format: not formatted (run scripts/check_format.sh --fix):\n' >&2
  printf '  %s\n' "${bad[@]}" >&2
  exit 1
fi
echo "check_format: ${#existing[@]} files formatted"
