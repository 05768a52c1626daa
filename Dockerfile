# syntax=docker/dockerfile:1
# The featurewire image: `featurewire-serve` (the gRPC server) by default; the trainer (`featurewire-train`,
# `torchrun -m trainer`) runs from the same image with another command. Two variants from one file:
#
#   docker build -t featurewire:0.1.0-gpu .                         # CUDA runtime base, CUDA build of torch
#   docker build -t featurewire:0.1.0-cpu --build-arg VARIANT=cpu . # slim Python base, CPU build of torch
#
# Nothing model-sized is baked in: mount the model cache at /cache (FEATUREWIRE_CACHE) and the stacks at
# /stacks from volumes, e.g. `docker run -v fw-cache:/cache -v "$PWD/runs:/stacks:ro" -p 50051:50051
# featurewire:0.1.0-cpu serve --model default --stack /stacks/demo/stack`.

ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Both base images are pinned by the tags above; checkov cannot see through `FROM ${ARG}`.
# checkov:skip=CKV_DOCKER_7: the base images come from ARGs whose defaults carry fixed version tags

# ---- bases: the venv is built and run by the same interpreter at the same path ---------------------------
FROM ${PYTHON_IMAGE} AS base-cpu

FROM ${CUDA_IMAGE} AS base-gpu
# The distribution's Python (3.12 on Ubuntu 24.04); the base image tag pins the release, and the
# packages follow its security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# base-${VARIANT} is one of the two stages above, not an image from a registry.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/featurewire \
    PATH=/opt/featurewire/bin:$PATH

# ---- build: a virtual environment with torch (pinned, installed first), the service, trainer and client -
FROM base AS build
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
SHELL ["/bin/sh", "-eu", "-c"]
RUN python3 -m venv /opt/featurewire
# torch first and pinned: an unpinned torch resolved later would pull a different (or CUDA) build.
RUN case "${VARIANT}" in \
      cpu) pip install --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}" ;; \
      gpu) pip install "torch==${TORCH_VERSION}" ;; \
      *) echo "VARIANT must be cpu or gpu, got '${VARIANT}'" >&2; exit 1 ;; \
    esac
WORKDIR /src
COPY clients/python/ clients/python/
COPY pyproject.toml README.md constraints.txt ./
COPY core/ core/
COPY service/ service/
COPY trainer/ trainer/
RUN pip install -c constraints.txt ./clients/python . \
    && python3 -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__"

# ---- runtime ---------------------------------------------------------------------------------------------
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="featurewire" \
      org.opencontainers.image.description="gRPC inference-and-steering service for sparse-autoencoder stacks" \
      io.featurewire.variant="${VARIANT}"
RUN groupadd --system --gid 10001 featurewire \
    && useradd --system --uid 10001 --gid featurewire --home-dir /home/featurewire --create-home \
       --shell /usr/sbin/nologin featurewire \
    && mkdir -p /cache /stacks \
    && chown featurewire:featurewire /cache /stacks
COPY --from=build /opt/featurewire /opt/featurewire
# Caches that libraries may write go to /tmp (an emptyDir under a read-only root filesystem); the model
# cache goes to the /cache volume. Models are never fetched from a hub.
ENV HOME=/home/featurewire \
    FEATUREWIRE_CACHE=/cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TRITON_CACHE_DIR=/tmp/triton
USER 10001:10001
WORKDIR /home/featurewire
EXPOSE 50051 8080 9090
# For `docker run`; Kubernetes ignores it and uses native gRPC probes on the same health service names.
# Plaintext only: with TLS on, rely on the orchestrator's probes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; channel = grpc.insecure_channel('127.0.0.1:' + os.environ.get('FEATUREWIRE_PORT', '50051')); reply = g.HealthStub(channel).Check(h.HealthCheckRequest(service='readiness'), timeout=3); sys.exit(reply.status != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["featurewire-serve"]
CMD ["serve"]
