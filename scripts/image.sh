#!/usr/bin/env bash
# Builds the icecached container image with podman and checks it as an operator would, on a
# Debian 12 machine that reaches nothing but Debian's mirror and PyPI (no Docker Hub, no
# NVIDIA registry):
#   1. installs podman, runc, mmdebstrap and their helpers from Debian (once);
#   2. makes the Debian 12 base image with mmdebstrap from the mirror apt uses, and imports it
#      as the local debian:12 and debian:12-slim the Dockerfile starts from (cached);
#   3. downloads the CUDA 13 toolkit wheels from PyPI (cached);
#   4. builds the Dockerfile with CUDA_SOURCE=pypi (podman's layer cache makes a rebuild of
#      unchanged sources take seconds);
#   5. runs the image with its socket directory bind-mounted from the host and checks: gRPC
#      health SERVING through `icecache status` from the host and inside the container, the
#      image's HEALTHCHECK command, /metrics through a published port, the daemon's uid (10001),
#      no compiler or toolkit in the image, and that SIGTERM stops it with exit status 0 and
#      removes its sockets;
#   6. prints the image size, the build and start times and the checks' results.
# Exit status: 0 when every check passes, 1 when one fails, 2 on a usage error, 3 when the
# set-up or the build fails. Idempotent; two runs on one cache directory wait for each other.
#
#   scripts/image.sh [--context DIR] [--cache-dir DIR] [--tag NAME] [--cuda-version VERSION]
#                    [--cuda-architectures "80;90"] [--host-cli PATH] [--mirror URL]
#                    [--refresh-base] [--save FILE] [--build-only | --check-only]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
args=("$@")
context="$root"
cache="${ICECACHE_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/icecache-image}"
image="localhost/icecache/icecached:dev"
cuda_version="13.0.2"
cuda_architectures="80;90"
host_cli=""
save=""
mirror=""
refresh_base=0
do_build=1
do_check=1
uid_expected=10001
base_max_age_days=30

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
  cat <<EOF
Options:
  --context DIR             build context (default: this repository, $root)
  --cache-dir DIR           base tarball, wheels, podman storage and logs
                            (default: \$ICECACHE_IMAGE_CACHE, else ~/.cache/icecache-image)
  --tag NAME                image name (default: $image)
  --cuda-version VERSION    CUDA 13 release whose PyPI wheels build the kernels (default: $cuda_version)
  --cuda-architectures LIST CMake CUDA architectures (default: $cuda_architectures)
  --host-cli PATH           an icecache binary for the host-side check (default: the image's
                            own, run from the image's file system with the image's libraries)
  --mirror URL              Debian mirror for the base (default: the one apt uses here)
  --refresh-base            make the base again (otherwise reused for $base_max_age_days days)
  --save FILE               also write the image to FILE (docker-archive: docker load / podman
                            load read it), after the checks passed
  --build-only              build, do not run the checks
  --check-only              check the image built before, do not build
EOF
}

die() { echo "image.sh: error: $*" >&2; exit 3; }
say() { echo "image.sh: $*"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
seconds_since() { local d=$(( $(now_ms) - $1 )); printf '%d.%d' $((d / 1000)) $((d % 1000 / 100)); }

while (($#)); do
  case "$1" in
    --context) context="$2"; shift ;;
    --context=*) context="${1#*=}" ;;
    --cache-dir) cache="$2"; shift ;;
    --cache-dir=*) cache="${1#*=}" ;;
    --tag) image="$2"; shift ;;
    --tag=*) image="${1#*=}" ;;
    --cuda-version) cuda_version="$2"; shift ;;
    --cuda-version=*) cuda_version="${1#*=}" ;;
    --cuda-architectures) cuda_architectures="$2"; shift ;;
    --cuda-architectures=*) cuda_architectures="${1#*=}" ;;
    --host-cli) host_cli="$2"; shift ;;
    --host-cli=*) host_cli="${1#*=}" ;;
    --save) save="$2"; shift ;;
    --save=*) save="${1#*=}" ;;
    --mirror) mirror="$2"; shift ;;
    --mirror=*) mirror="${1#*=}" ;;
    --refresh-base) refresh_base=1 ;;
    --build-only) do_check=0 ;;
    --check-only) do_build=0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "image.sh: unknown argument '$1' (--help lists the options)" >&2; exit 2 ;;
  esac
  shift
done
((do_build || do_check)) || { echo "image.sh: --build-only and --check-only exclude each other" >&2; exit 2; }
[[ "$cuda_version" == 13.* ]] || {
  echo "image.sh: --cuda-version $cuda_version: PyPI has nvcc for CUDA 13 only" >&2; exit 2; }
context="$(cd "$context" 2>/dev/null && pwd)" || die "no such context directory"
[[ -f "$context/Dockerfile" ]] || die "$context has no Dockerfile"
[[ -z "$save" ]] || save="$(readlink -f "$save")"
if [[ -n "$host_cli" ]]; then
  host_cli="$(readlink -f "$host_cli")"
  [[ -x "$host_cli" ]] || die "--host-cli $host_cli is not an executable"
fi

if [[ $(id -u) -ne 0 ]]; then
  # podman builds and runs as root here (chroot isolation, runc, its own storage).
  command -v sudo >/dev/null 2>&1 || die "run as root (podman's storage and mounts need it)"
  exec sudo --preserve-env=ICECACHE_IMAGE_CACHE,PIP_INDEX_URL,PIP_CERT,http_proxy,https_proxy \
    "${BASH_SOURCE[0]}" --cache-dir "$cache" "${args[@]}"
fi

mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
mkdir -p "$cache/base" "$cache/wheels" "$cache/logs" "$cache/tmp"
exec 9>"$cache/lock"
if ! flock -n 9; then
  say "another image.sh uses $cache; waiting for it"
  flock 9
fi

# ---------------------------------------------------------------------------------------------
say "[1/6] host packages"
host_packages=(podman runc conmon containernetworking-plugins iptables mmdebstrap ca-certificates
               curl python3 python3-pip)
missing=()
for p in "${host_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing ${missing[*]} from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$cache/logs/apt.log" 2>&1 \
    || { tail -20 "$cache/logs/apt.log"; die "installing ${missing[*]} failed"; }
fi
say "$(podman --version), $(runc --version | head -1), mmdebstrap $(mmdebstrap --version | awk '{print $2}')"

# Podman with everything of its own under the cache directory: storage, run state, events.
# runc: crun, podman's default, fails on hybrid cgroup hierarchies such as these machines'.
driver="${ICECACHE_IMAGE_STORAGE_DRIVER:-}"
if [[ -z "$driver" ]]; then
  if [[ -f "$cache/storage-driver" ]]; then
    driver="$(cat "$cache/storage-driver")"
  else
    # Native overlay where the kernel allows it (fast); vfs, which copies every layer, else.
    probe="$cache/tmp/overlay-probe"
    rm -rf "$probe"; mkdir -p "$probe"/{lower,upper,work,merged}
    if mount -t overlay overlay -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" \
         "$probe/merged" 2>/dev/null; then
      umount "$probe/merged"; driver=overlay
    else
      driver=vfs
    fi
    rm -rf "$probe"
    echo "$driver" >"$cache/storage-driver"
  fi
fi
# Run state goes under /run (a tmpfs on most hosts, so a reboot clears it, as podman expects),
# one directory per cache directory.
state="/run/icecache-image/$(echo -n "$cache" | sha256sum | cut -c1-12)"
mkdir -p "$state" 2>/dev/null || state="$cache/run"
pod() {
  TMPDIR="$cache/tmp" podman --root "$cache/storage-$driver" --runroot "$state/storage" \
    --tmpdir "$state/libpod" --storage-driver "$driver" --runtime runc \
    --events-backend file "$@"
}
if ! pod info >"$cache/logs/podman-info.log" 2>&1; then
  tail -5 "$cache/logs/podman-info.log"
  die "podman does not start with the storage in $cache/storage-$driver (delete $cache to start afresh)"
fi
say "podman storage: $cache/storage-$driver ($driver)"

# ---------------------------------------------------------------------------------------------
# The Debian sources for the base: those apt uses on this machine (from `apt-cache policy`,
# Debian's own archives only), else deb.debian.org.
debian_sources() {
  if [[ -n "$mirror" ]]; then
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$mirror" "$mirror"
    printf 'deb %s-security bookworm-security main\n' "${mirror%/}"
    return
  fi
  local lines
  lines="$(apt-cache policy 2>/dev/null | awk '
    /^ *[0-9]+ (https?|file):\/\// { uri = $2; split($3, s, "/"); suite = s[1]; comp = s[2]; next }
    /release .*o=Debian,/ && uri != "" && suite ~ /^bookworm(-updates|-security)?$/ {
      print "deb " uri " " suite " " comp }
    { uri = "" }' | sort -u)"
  if [[ -z "$lines" ]]; then
    lines=$'deb http://deb.debian.org/debian bookworm main\ndeb http://deb.debian.org/debian bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main'
  fi
  echo "$lines"
}

if ((do_build)); then
  say "[2/6] Debian 12 base image"
  base_tar="$cache/base/debian-12-minbase.tar"
  if [[ -f "$base_tar" ]] && ((!refresh_base)) \
     && [[ -z "$(find "$base_tar" -mtime +"$base_max_age_days")" ]]; then
    say "reusing $base_tar (made $(date -r "$base_tar" '+%Y-%m-%d %H:%M'))"
  else
    mapfile -t sources < <(debian_sources)
    say "mmdebstrap: minbase bookworm from ${#sources[@]} sources:"
    printf '    %s\n' "${sources[@]}"
    t0=$SECONDS
    # Like Docker's debian:12-slim: merged /usr set up as debootstrap does (usr-is-merged, not
    # usrmerge and the perl it needs); no manuals, documentation (but the copyright files) or
    # translations; apt keeps no downloaded packages in the image.
    mmdebstrap --variant=minbase --mode=root --format=tar --quiet \
      --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
      --customize-hook='echo "APT::Keep-Downloaded-Packages \"false\";" >"$1/etc/apt/apt.conf.d/90keep-no-debs"' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      bookworm "$base_tar.partial" "${sources[@]}" >"$cache/logs/mmdebstrap.log" 2>&1 \
      || { tail -20 "$cache/logs/mmdebstrap.log"; die "mmdebstrap failed"; }
    mv "$base_tar.partial" "$base_tar"
    say "base made in $((SECONDS - t0)) s ($(du -m "$base_tar" | cut -f1) MB)"
  fi
  base_sum="$(sha256sum "$base_tar" | cut -c1-64)"
  have_sum="$(pod image inspect -f '{{index .Labels "org.icecache.base.sha256"}}' \
                localhost/debian:12-slim 2>/dev/null || true)"
  if [[ "$have_sum" != "$base_sum" ]]; then
    pod import --change 'CMD ["bash"]' --change "LABEL org.icecache.base.sha256=$base_sum" \
      "$base_tar" localhost/debian:12-slim >"$cache/logs/import.log" 2>&1 \
      || { cat "$cache/logs/import.log"; die "podman import of the base failed"; }
    say "imported as localhost/debian:12-slim"
  fi
  pod tag localhost/debian:12-slim localhost/debian:12

  # -------------------------------------------------------------------------------------------
  say "[3/6] CUDA $cuda_version toolkit wheels (PyPI)"
  wheels="$cache/wheels/cuda-$cuda_version"
  if [[ -f "$wheels/.complete" ]]; then
    say "reusing $wheels ($(du -sm "$wheels" | cut -f1) MB)"
  else
    py=""
    for candidate in python3 /usr/bin/python3; do
      if "$candidate" -m pip --version >/dev/null 2>&1; then py="$candidate"; break; fi
    done
    [[ -n "$py" ]] || die "no python3 with pip"
    rm -rf "$wheels.partial"
    t0=$SECONDS
    # The same requirement deploy/docker/install-cuda-toolkit.sh installs in the image.
    "$py" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
      --dest "$wheels.partial" "cuda-toolkit[nvcc,cudart,cccl,crt,nvvm]==$cuda_version" \
      >"$cache/logs/pip.log" 2>&1 || { tail -20 "$cache/logs/pip.log"; die "pip download failed"; }
    rm -rf "$wheels"; mv "$wheels.partial" "$wheels"; touch "$wheels/.complete"
    say "downloaded $(ls "$wheels"/*.whl | wc -l) wheels ($(du -sm "$wheels" | cut -f1) MB) in $((SECONDS - t0)) s"
  fi

  # -------------------------------------------------------------------------------------------
  say "[4/6] building $image from $context"
  log="$cache/logs/build-$(date +%Y%m%d-%H%M%S).log"
  say "full log: $log"
  t0=$SECONDS
  set +e
  pod build --pull=never --isolation=chroot --format=docker --layers \
    --build-arg CUDA_SOURCE=pypi --build-arg CUDA_VERSION="$cuda_version" \
    --build-arg CUDA_ARCHITECTURES="$cuda_architectures" \
    -v "$wheels:/var/cache/cuda-wheels:ro" \
    -t "$image" -f "$context/Dockerfile" "$context" 2>&1 | tee "$log" \
    | grep --line-buffered -E '^(\[[0-9]+/[0-9]+\] )?STEP [0-9]+/[0-9]+: (FROM|RUN|COPY)|^(bootstrap|build\.sh|install-cuda-toolkit):|^-- IceCache:|^Error' \
    | sed -u -e 's/^/    /' -e 's/\(.\{150\}\).*/\1 .../'
  rc=${PIPESTATUS[0]}
  set -e
  build_seconds=$((SECONDS - t0))
  if ((rc != 0)); then
    echo "---- last lines of $log ----"; tail -40 "$log"
    die "podman build failed (exit $rc) after $build_seconds s"
  fi
  steps="$(grep -E '^(\[[0-9]+/[0-9]+\] )?STEP ' "$log" | grep -vc ': FROM ' || true)"
  cached="$(grep -c '^--> Using cache' "$log" || true)"
  say "built in $build_seconds s ($cached of $steps steps from the layer cache)"
fi

pod image exists "$image" || die "no image $image (build it first)"
size_bytes="$(pod image inspect -f '{{.Size}}' "$image")"
size_mb=$((size_bytes / 1000000))

# ---------------------------------------------------------------------------------------------
pass=0
failures=()
ok() { pass=$((pass + 1)); echo "    ok    $1"; }
bad() { failures+=("$1"); echo "    FAIL  $1"; }
expect() {  # expect WHAT GOT WANT
  if [[ "$2" == "$3" ]]; then ok "$1: $2"; else bad "$1: got '$2', want '$3'"; fi
}
expect_match() {  # expect_match WHAT TEXT REGEX
  if grep -qE -- "$3" <<<"$2"; then ok "$1"; else bad "$1: no match for /$3/ in: $(head -c 400 <<<"$2")"; fi
}

start_seconds=""
stop_seconds=""
if ((do_check)); then
  say "[5/6] running $image and checking it"
  checks_t0=$SECONDS
  work="$(mktemp -d "$cache/tmp/check.XXXXXX")"
  name="icecache-image-check-$$"
  mnt=""
  cleanup() {
    pod rm -f -t 0 "$name" >/dev/null 2>&1 || true
    [[ -n "$mnt" ]] && pod image unmount "$image" >/dev/null 2>&1 || true
    rm -rf "$work"
  }
  trap cleanup EXIT

  # What the build context's commit makes the daemon report (CMake: git rev-parse --short=8).
  commit="$(git -C "$context" rev-parse --short=8 HEAD 2>/dev/null || echo unknown)"

  # The CLI on the host: the given one, or the image's own run with the image's loader and
  # libraries: either way a host process talking to the socket in the host's directory.
  if [[ -n "$host_cli" ]]; then
    cli=("$host_cli")
  else
    mnt="$(pod image mount "$image")" || die "podman image mount failed"
    loader=""
    for f in "$mnt"/usr/lib64/ld-linux-*.so.* "$mnt"/usr/lib/ld-linux-*.so.*; do
      [[ -e "$f" ]] && { loader="$f"; break; }
    done
    [[ -n "$loader" ]] || die "no dynamic loader in the image"
    cli=("$loader" --library-path "$mnt/usr/lib/$(uname -m)-linux-gnu" "$mnt/usr/local/bin/icecache")
  fi

  sockets="$work/run-icecache"  # the operator's host directory for the sockets
  install -d -m 0755 -o "$uid_expected" -g "$uid_expected" "$sockets"
  sock="$sockets/icecached.sock"
  memory_limit_bytes=$((256 * 1024 * 1024))
  # Resource limits: podman would raise them to its own defaults, which needs CAP_SYS_RESOURCE
  # (these machines' root lacks it); the container keeps this shell's file limit, and 4096
  # processes, which runc may set here. Healthchecks need systemd timers; the HEALTHCHECK
  # command is run by hand below.
  t0=$(now_ms)
  pod run -d --name "$name" \
    --ulimit "nofile=$(ulimit -Sn):$(ulimit -Hn)" --ulimit nproc=4096:4096 \
    --no-healthcheck -v "$sockets:/run/icecache" -p 127.0.0.1::9464 \
    "$image" --memory-limit=256MiB >/dev/null || die "podman run failed"

  status_json=""
  for _ in $(seq 1 600); do
    if [[ -S "$sock" ]] && status_json="$("${cli[@]}" --socket="$sock" --json status 2>/dev/null)"; then
      break
    fi
    if [[ "$(pod inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" != true ]]; then
      pod logs "$name" 2>&1 | tail -20
      die "the container exited before serving"
    fi
    sleep 0.1
  done
  start_seconds="$(seconds_since "$t0")"

  echo "  serving, from the host:"
  expect_match "host: icecache status on $sock says SERVING (gRPC health)" \
    "$status_json" '"health":"SERVING"'
  expect_match "host: the daemon reports the context's commit $commit" "$status_json" "$commit"
  expect "host: socket owner uid and mode" "$(stat -c '%u %a' "$sock" 2>/dev/null)" "$uid_expected 666"
  expect "host: attach socket beside it" "$(stat -c '%F' "$sockets/icecached.attach.sock" 2>/dev/null)" "socket"
  pid="$(pod inspect -f '{{.State.Pid}}' "$name")"
  expect "host: the container's PID 1 is icecached" "$(cat "/proc/$pid/comm" 2>/dev/null)" "icecached"
  expect "host: its real, effective, saved and fs uids" \
    "$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$pid/status" 2>/dev/null)" \
    "$uid_expected $uid_expected $uid_expected $uid_expected"

  echo "  inside the container:"
  out="$(pod exec "$name" icecache --json status 2>&1)" || true
  expect_match "container: icecache status (ICECACHE_SOCKET, no flags) says SERVING" "$out" '"health":"SERVING"'
  expect "container: id -u of an exec" "$(pod exec "$name" id -u 2>&1)" "$uid_expected"
  hc="$(pod image inspect -f '{{json .Config.Healthcheck.Test}}' "$image" 2>/dev/null)"
  expect "image: HEALTHCHECK (kept by --format=docker)" "$hc" '["CMD","/usr/local/bin/icecache","status"]'
  if pod exec "$name" /usr/local/bin/icecache status >/dev/null 2>&1; then
    ok "container: the HEALTHCHECK command exits 0"
  else
    bad "container: the HEALTHCHECK command failed"
  fi
  expect "image: USER" "$(pod image inspect -f '{{.Config.User}}' "$image")" "$uid_expected:$uid_expected"
  tools="$(pod exec "$name" sh -c 'for t in gcc cc g++ c++ cpp clang nvcc cmake make ninja ld as pip; do
             command -v "$t"; done; ls -d /usr/local/cuda* 2>/dev/null; true' 2>&1)"
  expect "container: compilers, build tools or a CUDA toolkit on it" "${tools:-none}" "none"
  devpkgs="$(pod exec "$name" dpkg-query -W -f '${Package}\n' 2>&1 \
             | grep -E -- '-dev$|^(gcc|g\+\+|cpp|clang|binutils|build-essential|make|cmake|ninja-build)(-[0-9.]+)?$|^(cuda|nvidia|libcuda|libnvidia)' || true)"
  expect "container: compiler, -dev or CUDA packages installed" "${devpkgs:-none}" "none"

  echo "  metrics:"
  port="$(pod port "$name" 9464/tcp | head -1 | sed 's/.*://')"
  metrics="$(curl -fsS --max-time 10 "http://127.0.0.1:$port/metrics" 2>&1)" || true
  expect_match "host: /metrics on the published port 127.0.0.1:$port answers with icecache_build_info of $commit" \
    "$metrics" "^icecache_build_info\\{.*commit=\"$commit\""
  expect_match "host: /metrics has icecache_memory_limit_bytes = --memory-limit=256MiB" \
    "$metrics" "^icecache_memory_limit_bytes $memory_limit_bytes(\\.0+)?$|^icecache_memory_limit_bytes $memory_limit_bytes\$"

  echo "  SIGTERM:"
  t1=$(now_ms)
  pod kill --signal TERM "$name" >/dev/null
  for _ in $(seq 1 600); do
    [[ "$(pod inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" == true ]] || break
    sleep 0.1
  done
  stop_ms=$(( $(now_ms) - t1 ))
  stop_seconds="$(printf '%d.%d' $((stop_ms / 1000)) $((stop_ms % 1000 / 100)))"
  code="$(pod inspect -f '{{.State.ExitCode}}' "$name" 2>&1)"
  [[ "$(pod inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" == true ]] && code="still running"
  expect "container: exit status after SIGTERM" "$code" "0"
  if ((stop_ms < 10000)); then
    ok "container: stopped in $stop_seconds s, within the daemon's 10 s shutdown grace"
  else
    bad "container: took $stop_seconds s to stop (the daemon's shutdown grace is 10 s, no RPC was in flight)"
  fi
  logs="$(pod logs "$name" 2>&1)"
  expect_match "container: the daemon logged a clean shutdown" "$logs" "shutdown complete"
  expect "host: sockets left in $sockets" "$(ls -A "$sockets" | tr '\n' ' ' | sed 's/ $//')" ""
fi

# ---------------------------------------------------------------------------------------------
say "[6/6] summary (all steps: $SECONDS s)"
echo "  image          $image"
echo "  size           $size_mb MB ($size_bytes bytes)"
if ((do_build)); then
  echo "  build time     $build_seconds s ($cached of $steps steps cached; CUDA $cuda_version from PyPI, architectures $cuda_architectures)"
fi
if ((do_check)); then
  echo "  start time     $start_seconds s (podman run to health SERVING)"
  echo "  stop time      $stop_seconds s (SIGTERM to exit)"
  echo "  checks time    $((SECONDS - checks_t0)) s"
  echo "  checks         $pass passed, ${#failures[@]} failed"
  echo "  cache          $cache ($(du -sm "$cache" 2>/dev/null | cut -f1) MB)"
  if ((${#failures[@]})); then
    printf '  failed: %s\n' "${failures[@]}"
    exit 1
  fi
fi
if [[ -n "$save" ]]; then
  rm -f "$save"
  pod save --format docker-archive -o "$save" "$image" >"$cache/logs/save.log" 2>&1 \
    || { cat "$cache/logs/save.log"; die "podman save failed"; }
  echo "  saved          $save ($(du -m "$save" | cut -f1) MB; docker load -i / podman load -i)"
fi
exit 0
