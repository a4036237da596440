#!/usr/bin/env bash
# The main job, end to end on a fresh machine: installs what is missing, builds, starts the
# daemon with its defaults and shows what an operator sees (status, configuration, metrics),
# then stops it with SIGTERM. The real-model demo replaces this once the data plane exists.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${ICECACHE_BUILD_DIR:-$root/build}"

"$root/scripts/build.sh"
daemon="$build/server/main/icecached"
cli="$build/client/cli/icecache"
# The defaults, with a private socket so that the demo never meets a daemon already running.
export ICECACHE_SOCKET="${ICECACHE_SOCKET:-/tmp/icecache-demo-$$/icecached.sock}"
log="$(dirname "$ICECACHE_SOCKET").log"

"$daemon" --metrics-port=0 2>"$log" &
pid=$!
cleanup() {
  kill -TERM "$pid" 2>/dev/null && wait "$pid" || true
  rm -rf "$(dirname "$ICECACHE_SOCKET")" "$log"
}
trap cleanup EXIT
for _ in $(seq 100); do
  "$cli" status >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done

echo "== icecached started with its defaults (a private socket and a free metrics port, so the demo never collides)"
grep -o 'icecached .* serving.*' "$log" | head -1
echo
echo "== icecache status"
"$cli" status
echo
echo "== icecache config"
"$cli" config
echo
port="$("$cli" --json config | grep -o '"metrics_port":[0-9]*' | cut -d: -f2)"
echo "== Prometheus metrics (curl http://127.0.0.1:$port/metrics, excerpt)"
curl -fsS "http://127.0.0.1:$port/metrics" | grep -E '^icecache_(memory|sequences|build_info)' || true
