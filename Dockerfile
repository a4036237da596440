# syntax=docker/dockerfile:1
#
# IceCache container image: icecached (the host daemon) and the icecache operator CLI.
#
#   docker build -t icecache/icecached:0.1.0 .
#   docker build --build-arg CUDA_VERSION=12.6.3 --build-arg CUDA_ARCHITECTURES="90" \
#                -t icecache/icecached:0.1.0-sm90 .
#
# Build arguments:
#   CUDA_VERSION        version tag of the nvidia/cuda devel image the CUDA toolkit is taken from
#                       (default 12.8.1; the toolkit must support gcc 12 and the architectures).
#   CUDA_IMAGE_OS       OS suffix of that image's tag (default ubuntu22.04); only its
#                       /usr/local/cuda is used (see below), so this choice is not load-bearing.
#   CUDA_ARCHITECTURES  CMake CUDA architectures the kernels are built for (default "80;90":
#                       A100, H100/H200). Add 100 for B200 (CUDA >= 12.8).
#   ICECACHE_UID/GID    the non-root user the daemon runs as (default 10001:10001); the
#                       Kubernetes manifests in deploy/kubernetes assume 10001.
#
# Stages:
#   cuda     nvidia/cuda:<CUDA_VERSION>-devel-<CUDA_IMAGE_OS>: the NVIDIA CUDA development image,
#            the source of the toolkit (nvcc, headers, cudart).
#   build    Debian 12 with that toolkit copied in. It runs exactly what the README and CI run
#            on a fresh machine: scripts/bootstrap.sh (Debian 12 package names) and
#            scripts/build.sh (warnings as errors). NVIDIA publishes no Debian CUDA images, and
#            the Ubuntu and UBI ones ship other versions of gRPC, protobuf, Abseil and
#            prometheus-cpp under other package names than the bootstrap installs; NVIDIA's
#            toolkit binaries themselves are distribution-independent (the same files as the
#            runfile installer), so the toolkit is copied out of the NVIDIA image into the same
#            Debian 12 that CI builds on, and CI's run of bootstrap.sh and build.sh exercises
#            this image's install and build steps.
#   runtime  debian:12-slim with the shared libraries the two binaries link and nothing else:
#            no compiler, no -dev package, no CUDA toolkit (cudart is linked statically; the
#            daemon itself never touches a GPU), running as a non-root user.
#
# No container engine runs on the project's development and CI machines, so this file is not
# built there; tests/deploy/check_dockerfile.py checks its structure (stages, COPY sources,
# runtime packages against the built binaries' libraries, no compilers in the runtime stage).

ARG CUDA_VERSION=12.8.1
ARG CUDA_IMAGE_OS=ubuntu22.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-${CUDA_IMAGE_OS} AS cuda

FROM debian:12 AS build
ARG CUDA_ARCHITECTURES="80;90"
# /usr/local/cuda is a symlink in the NVIDIA image; COPY follows it and copies the toolkit.
COPY --from=cuda /usr/local/cuda /usr/local/cuda
ENV PATH=/usr/local/cuda/bin:${PATH} \
    CUDACXX=/usr/local/cuda/bin/nvcc \
    DEBIAN_FRONTEND=noninteractive
WORKDIR /src
# The package layer depends on the bootstrap script only, so source edits reuse it.
COPY scripts/bootstrap.sh scripts/bootstrap.sh
RUN ./scripts/bootstrap.sh && rm -rf /var/lib/apt/lists/*
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
