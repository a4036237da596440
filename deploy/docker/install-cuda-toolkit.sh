#!/bin/sh
# Installs the parts of a CUDA toolkit that IceCache's build needs (nvcc with its front end,
# NVVM and ptxas, the runtime headers and libraries, CCCL) from NVIDIA's wheels on PyPI, in
# the layout of NVIDIA's own images: /usr/local/cuda-<major.minor> with /usr/local/cuda
# pointing at it, lib64 next to lib and targets/<arch>-linux for nvcc.profile. The Dockerfile's
# cuda-pypi stage runs it; it needs python3 with pip, nothing from NVIDIA's registry.
#
#   install-cuda-toolkit.sh VERSION [WHEEL_DIR]
#
# VERSION is a CUDA release as NVIDIA numbers it (13.0.2, 13.1.1, ...): the version of the
# `cuda-toolkit` metapackage, which pins every component wheel of that release. Only CUDA 13
# qualifies: the CUDA 12 nvcc wheels carry ptxas but no nvcc. With WHEEL_DIR holding *.whl
# files (scripts/image.sh binds its download cache there), pip installs from them alone and
# needs no network; otherwise it downloads from PyPI.
set -eu

version="${1:?usage: install-cuda-toolkit.sh VERSION [WHEEL_DIR]}"
wheels="${2:-}"
case "$version" in
  13.*) ;;
  *)
    echo "install-cuda-toolkit: CUDA $version cannot come from PyPI: only CUDA 13 (cuda-toolkit" \
         "13.0.0 and later) has nvcc in its wheels; build CUDA 12 with CUDA_SOURCE=nvidia" >&2
    exit 1 ;;
esac
major_minor="$(echo "$version" | cut -d. -f1,2)"
case "$(uname -m)" in
  x86_64) target=x86_64-linux ;;
  aarch64) target=sbsa-linux ;;
  *) echo "install-cuda-toolkit: no CUDA wheels for $(uname -m)" >&2; exit 1 ;;
esac

set -- --only-binary=:all: --no-compile --disable-pip-version-check --root-user-action=ignore
if [ -n "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
  echo "install-cuda-toolkit: CUDA $version from the wheels in $wheels"
  set -- "$@" --no-index --find-links="$wheels"
else
  echo "install-cuda-toolkit: CUDA $version from PyPI"
fi
staging="$(mktemp -d)"
# The extras select the components; each pins its wheel to this release.
python3 -m pip install --quiet --target="$staging" "$@" \
  "cuda-toolkit[nvcc,cudart,cccl,crt,nvvm]==$version"

prefix="/usr/local/cuda-$major_minor"
if [ -e "$prefix" ] || [ -e /usr/local/cuda ]; then
  echo "install-cuda-toolkit: $prefix or /usr/local/cuda exists already" >&2
  exit 1
fi
# Every CUDA 13 wheel unpacks into nvidia/cu13/{bin,include,lib,nvvm}.
mv "$staging/nvidia/cu13" "$prefix"
rm -rf "$staging"
# Wheels carry no symlinks: the linker names (libcudart.so -> libcudart.so.13, what
# CUDA::cudart links) are made here. CMake's FindCUDAToolkit and NVIDIA's nvcc.profile expect
# lib64 and targets/<arch>-linux.
for lib in "$prefix"/lib/lib*.so.*; do
  [ -e "$lib" ] || continue
  link="${lib%.so.*}.so"
  [ -e "$link" ] || ln -s "$(basename "$lib")" "$link"
done
ln -s lib "$prefix/lib64"
mkdir -p "$prefix/targets/$target"
ln -s ../../include "$prefix/targets/$target/include"
ln -s ../../lib "$prefix/targets/$target/lib"
ln -s "cuda-$major_minor" /usr/local/cuda

release="$("$prefix/bin/nvcc" --version | sed -n 's/^Cuda compilation tools, release \([0-9.]*\),.*/\1/p')"
if [ "$release" != "$major_minor" ]; then
  echo "install-cuda-toolkit: nvcc reports release '$release', expected $major_minor" >&2
  exit 1
fi
for f in include/cuda_runtime_api.h include/cccl/nv/target lib/libcudart.so lib/libcudart_static.a \
         nvvm/bin/cicc; do
  if [ ! -e "$prefix/$f" ]; then
    echo "install-cuda-toolkit: $prefix/$f is missing" >&2
    exit 1
  fi
done
echo "install-cuda-toolkit: nvcc $release in $prefix ($(du -sh "$prefix" | cut -f1))"
