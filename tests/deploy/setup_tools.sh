#!/usr/bin/env bash
# deploy_tools_setup (a ctest fixture): puts the deployment checks' tools into DIR, once.
#   - DIR/venv: a virtual environment with kubernetes-validate (PyPI, pinned): the Kubernetes
#     JSON schemas, 1.25 to 1.37, offline.
#   - Debian's kubectl 1.20 (its built-in kustomize is v2.0.3, the oldest the manifests must
#     render with): /usr/bin/kubectl when the kubernetes-client package provides it, else that
#     package fetched with apt-get download and unpacked into DIR/kubernetes-client (machines
#     whose /usr/bin/kubectl comes from another package, e.g. the Google Cloud SDK's).
#   - DIR/tools.env: KUBECTL_DEBIAN=<path>.
# Later runs reuse what is there (stamp files), so only the first needs the network.
set -euo pipefail
dir="$1"
kv_version=1.37.0
mkdir -p "$dir"

if [[ ! -f "$dir/venv/.kubernetes-validate-$kv_version" ]]; then
  rm -rf "$dir/venv"
  /usr/bin/python3 -m venv "$dir/venv"
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check --no-input \
    "kubernetes-validate==$kv_version"
  touch "$dir/venv/.kubernetes-validate-$kv_version"
fi
"$dir/venv/bin/python" -c 'import kubernetes_validate, yaml' 

if dpkg-query -W -f='${Status}' kubernetes-client 2>/dev/null | grep -q "install ok installed"; then
  kubectl=/usr/bin/kubectl
else
  kubectl="$dir/kubernetes-client/usr/bin/kubectl"
  if [[ ! -x "$kubectl" ]]; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    if ! (cd "$work" && apt-get download -qq kubernetes-client >/dev/null 2>&1); then
      # No package lists yet on this machine.
      apt-get update -qq >/dev/null
      (cd "$work" && apt-get download -qq kubernetes-client >/dev/null)
    fi
    rm -rf "$dir/kubernetes-client"
    dpkg-deb -x "$work"/kubernetes-client_*.deb "$dir/kubernetes-client"
  fi
fi
version="$("$kubectl" version --client --short 2>/dev/null || "$kubectl" version --client)"
if ! grep -q 'v1\.20\.' <<<"$version"; then
  echo "setup_tools: $kubectl is not Debian's kubectl 1.20: $version" >&2
  exit 1
fi
echo "KUBECTL_DEBIAN=$kubectl" >"$dir/tools.env"
echo "setup_tools: kubernetes-validate $kv_version in $dir/venv; Debian's kubectl: $kubectl ($version)"
