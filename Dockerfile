# syntax=docker/dockerfile:1
#
# IceCache container image: icecached (the host daemon) and the icecache operator CLI.
#
#   docker build -t icecache/icecached:0.1.0 .
#   docker build --build-arg CUDA_VERSION=12.6.3 --build-arg CUDA_ARCHITECTURES="90" \
#                -t icecache/icecached:0.1.0-sm90 .
#   docker build --build-arg CUDA_SOURCE=pypi --build-arg CUDA_VERSION=13.0.2 \
#                -t icecache/icecached:0.1.0 .        # no NVIDIA registry: toolkit from PyPI
#   scripts/image.sh                                 # podman, no registry at all; builds the
#                                                    # image, runs it and checks it
#
# Build arguments:
#   CUDA_SOURCE         where the build stage's CUDA toolkit comes from:
#                         nvidia (default)  NVIDIA's devel image nvidia/cuda:<CUDA_VERSION>-devel-
#                                           <CUDA_IMAGE_OS>: any CUDA 12 or 13 release NVIDIA
#                                           publishes an image of (gcc 12 needs CUDA >= 12.0).
#                         pypi              NVIDIA's wheels on PyPI (the cuda-toolkit metapackage
#                                           of that release, deploy/docker/install-cuda-toolkit.sh)
#                                           on Debian 12: CUDA 13.0.0 and later only (the CUDA 12
#                                           wheels have no nvcc); no registry but Debian's and PyPI.
#   CUDA_VERSION        the CUDA release (default 12.8.1; with pypi give a 13.x one, e.g. 13.0.2,
#                       the toolkit of the project's CI machines). The toolkit must support gcc 12
#                       and the architectures.
#   CUDA_IMAGE_OS       OS suffix of the NVIDIA image's tag (default ubuntu22.04); only its
#                       /usr/local/cuda is used (see below), so this choice is not load-bearing.
#   CUDA_ARCHITECTURES  CMake CUDA architectures the kernels are built for (default "80;90":
#                       A100, H100/H200). Add 100 for B200 (CUDA >= 12.8).
#   ICECACHE_UID/GID    the non-root user the daemon runs as (default 10001:10001); the
#                       Kubernetes manifests in deploy/kubernetes assume 10001.
#
# Stages:
#   cuda-nvidia  nvidia/cuda:<CUDA_VERSION>-devel-<CUDA_IMAGE_OS>: the NVIDIA CUDA development
#                image, the source of the toolkit (nvcc, headers, cudart).
#   cuda-pypi    Debian 12 with the same toolkit parts assembled from NVIDIA's PyPI wheels in the
#                layout of NVIDIA's image (/usr/local/cuda -> /usr/local/cuda-<major.minor>).
#   cuda         the one of the two that CUDA_SOURCE names; builders skip the other.
#   build        Debian 12 with that toolkit copied in. It runs exactly what the README and CI run
#                on a fresh machine: scripts/bootstrap.sh (Debian 12 package names) and
#                scripts/build.sh (warnings as errors). NVIDIA publishes no Debian CUDA images, and
#                the Ubuntu and UBI ones ship other versions of gRPC, protobuf, Abseil and
#                prometheus-cpp under other package names than the bootstrap installs; NVIDIA's
#                toolkit binaries themselves are distribution-independent (the same files as the
#                runfile installer), so the toolkit is copied out of the NVIDIA image into the same
#                Debian 12 that CI builds on, and CI's run of bootstrap.sh and build.sh exercises
#                this image's install and build steps.
#   runtime      debian:12-slim with the shared libraries the two binaries link and nothing else:
#                no compiler, no -dev package, no CUDA toolkit (the two binaries link no CUDA
#                library: the daemon never touches a GPU; the toolkit builds the client library's
#                kernels, which the image does not ship), running as a non-root user.
#
# scripts/image.sh builds this file with podman from Debian's packages alone (base images made
# by mmdebstrap, CUDA_SOURCE=pypi), runs the image and checks it as an operator would (ctest
# label "image", see deploy/README.md); tests/deploy/check_dockerfile.py checks what a run
# cannot see (both toolkit stages, COPY sources, the runtime packages against the binaries'
# libraries).

ARG CUDA_SOURCE=nvidia
ARG CUDA_VERSION=12.8.1
ARG CUDA_IMAGE_OS=ubuntu22.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-${CUDA_IMAGE_OS} AS cuda-nvidia

FROM debian:12 AS cuda-pypi
ARG CUDA_VERSION
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3-pip \
 && rm -rf /var/lib/apt/lists/*
COPY deploy/docker/install-cuda-toolkit.sh /usr/local/sbin/install-cuda-toolkit
# /var/cache/cuda-wheels: wheels downloaded beforehand, if a builder mounts them there
# (scripts/image.sh does); otherwise pip downloads from PyPI into its cache mount.
RUN --mount=type=cache,target=/root/.cache/pip \
    install-cuda-toolkit "${CUDA_VERSION}" /var/cache/cuda-wheels

FROM cuda-${CUDA_SOURCE} AS cuda

FROM debian:12 AS build
ARG CUDA_ARCHITECTURES="80;90"
# /usr/local/cuda is a symlink in both toolkit stages; COPY follows it and copies the toolkit.
COPY --from=cuda /usr/local/cuda /usr/local/cuda
ENV PATH=/usr/local/cuda/bin:${PATH} \
    CUDACXX=/usr/local/cuda/bin/nvcc \
    DEBIAN_FRONTEND=noninteractive
WORKDIR /src
# The package layer depends on the bootstrap script only, so source edits reuse it.
COPY scripts/bootstrap.sh scripts/bootstrap.sh
RUN ./scripts/bootstrap.sh && rm -rf /var/lib/apt/lists/*
# Debian 12's CMake 3.25.1 cannot configure against a toolkit without libnvToolsExt (CUDA 13):
# FindCUDAToolkit sets a property on the target it did not create. CMake 3.25.2 fixed that line
# (it checks the target first); the project's CI machines carry the same fix. Applied only where
# the line is still the broken one.
RUN sed -i 's/^\( *if(\)\(CMAKE_MINIMUM_REQUIRED_VERSION VERSION_GREATER_EQUAL 3.25)\)$/\1TARGET CUDA::nvToolsExt AND \2/' \
      /usr/share/cmake-*/Modules/FindCUDAToolkit.cmake
COPY . .
# The same build command as the README and CI; tests and benchmarks are left out of the image.
RUN ICECACHE_BUILD_DIR=/src/build ./scripts/build.sh \
      -DICECACHE_CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES}" \
      -DICECACHE_BUILD_TESTS=OFF -DICECACHE_BUILD_BENCHMARKS=OFF
# Debug sections stripped, symbols kept (readable backtraces).
RUN install -D -m 0755 build/server/main/icecached /out/usr/local/bin/icecached \
 && install -D -m 0755 build/client/cli/icecache /out/usr/local/bin/icecache \
 && strip --strip-debug /out/usr/local/bin/icecached /out/usr/local/bin/icecache \
 && install -D -m 0755 deploy/docker/icecached-entrypoint.sh /out/usr/local/bin/icecached-entrypoint \
 && install -D -m 0644 LICENSE /out/usr/share/doc/icecache/LICENSE

FROM debian:12-slim AS runtime
ARG ICECACHE_UID=10001
ARG ICECACHE_GID=10001
# Exactly the libraries `ldd` lists for icecached and icecache (tests/deploy checks this list
# against the built binaries).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libabsl20220623 libc-ares2 libcivetweb1 libgcc-s1 libgrpc++1.51 libgrpc29 \
      libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 libprotobuf32 libre2-9 libssl3 \
      libstdc++6 zlib1g \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid "${ICECACHE_GID}" icecache \
 && useradd --system --uid "${ICECACHE_UID}" --gid "${ICECACHE_GID}" --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin icecache \
 && install -d -m 0755 -o "${ICECACHE_UID}" -g "${ICECACHE_GID}" /run/icecache
COPY --from=build /out/ /
# The daemon and the CLI agree on the socket without flags (the CLI in `kubectl exec`).
ENV ICECACHE_SOCKET=/run/icecache/icecached.sock
USER ${ICECACHE_UID}:${ICECACHE_GID}
# 9464: Prometheus /metrics. 50051: the control API over TCP when --tcp is given (kubelet's
# gRPC probes need it; unauthenticated, see deploy/README.md).
EXPOSE 9464 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s CMD ["/usr/local/bin/icecache", "status"]
LABEL org.opencontainers.image.title="icecached" \
      org.opencontainers.image.description="IceCache KV-cache offload daemon and CLI" \
      org.opencontainers.image.licenses="MIT"
ENTRYPOINT ["/usr/local/bin/icecached-entrypoint"]
