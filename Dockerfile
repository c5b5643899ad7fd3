# Kiln server image for NVIDIA GPUs (the gateway runs from it too: `kiln gateway`).
#
#   docker build -t kiln .                                    # torch + onnxruntime-gpu
#   docker build -t kiln --build-arg WITH_TENSORRT=1 .        # + TensorRT 10
#
# Engines are built for the exact GPU they run on, so build them in the container on the
# serving GPU, into the engines volume, then serve them (tokens are required off loopback,
# and over plain text only with --allow-plaintext-tokens; or add --tls-cert/--tls-key):
#   docker run --gpus all --shm-size 2g -v $PWD/engines:/engines kiln \
#       kiln build-engines --format tensorrt --out /engines
#   docker run --gpus all --shm-size 2g -v $PWD/engines:/engines:ro \
#       -e KILN_API_TOKENS=... -p 50051:50051 -p 8002:8002 kiln \
#       kiln serve --backend tensorrt --engines /engines --allow-plaintext-tokens
# --shm-size: the API and engine processes pass images through /dev/shm, and Docker's 64 MB
# default is too small for SDXL batches.
#
# CUDA pairing (keep the four build arguments consistent): torch 2.13 is published for
# CUDA 12.6 (legacy, pre-Turing GPUs) and CUDA 13.0 (stable; no CUDA 12.8 builds), so the
# base image is CUDA 13.0 with cuDNN, torch comes from PyTorch's cu130 index, onnxruntime-gpu
# from ONNX Runtime's CUDA 13 feed (PyPI's onnxruntime-gpu is built for CUDA 12) and
# TensorRT as tensorrt-cu13. For GPUs older than Turing (sm_75), which CUDA 13 no longer
# supports, build the CUDA 12 set instead:
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
#   --build-arg ONNXRUNTIME_INDEX=https://pypi.org/simple
#   --build-arg TENSORRT_PACKAGE=tensorrt-cu12
# The host needs an NVIDIA driver new enough for the image's CUDA (580+ for CUDA 13.0).
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---- build: a virtual environment in /opt/kiln with every package, no sources ----------
FROM ${CUDA_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG ONNXRUNTIME_INDEX=https://aiinfra.pkgs.visualstudio.com/PublicPackages/_packaging/onnxruntime-cuda-13/pypi/simple/
ARG TENSORRT_PACKAGE=tensorrt-cu13
ARG WITH_TENSORRT=0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/kiln/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu 24.04's python3 is 3.12 (Kiln needs 3.11+); a venv keeps pip off the system
# Python, which Debian marks externally managed. DL3008 (pin apt versions) is ignored: the
# base image's Ubuntu release fixes python3's minor version, and an exact patch pin would
# break the build at each Ubuntu security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/kiln

WORKDIR /src
COPY constraints.txt ./
# torch first, in its own layer (several GB, changes only with constraints.txt). The
# constraint is 2.13.0, which 2.13.0+cu130 satisfies. Never torchvision.
RUN pip install --index-url "$TORCH_INDEX" "torch==$(sed -n 's/^torch==//p' constraints.txt)"

# The client distribution, then the server distribution that depends on it.
COPY clients/python clients/python
COPY pyproject.toml README.md ./
COPY server server
COPY build_engines build_engines
COPY training training
COPY protos protos
# open_clip ships the CLIP BPE vocabulary the tokenizers are built from; only that data file
# is used, so its dependencies (torchvision among them) stay out (as in the Makefile).
# onnxruntime-gpu replaces, never sits beside, the CPU onnxruntime that `kiln` depends on; it
# comes alone (--no-deps) from its CUDA-matched index, its dependencies being those already
# installed with onnxruntime.
RUN pip install -c constraints.txt ./clients/python \
    && pip install -c constraints.txt . \
    && pip install --no-deps -c constraints.txt open_clip_torch \
    && pip uninstall -y onnxruntime \
    && pip install --no-deps --index-url "$ONNXRUNTIME_INDEX" "onnxruntime-gpu>=1.24,<2" \
    && if [ "$WITH_TENSORRT" = "1" ]; then \
        pip install --extra-index-url https://pypi.nvidia.com "${TENSORRT_PACKAGE}>=10.13,<11"; \
    fi \
    && if pip show torchvision >/dev/null 2>&1; then echo "torchvision must not be installed" >&2; exit 1; fi

# ---- runtime: the CUDA runtime, python3, the venv, the shipped model ------------------
FROM ${CUDA_IMAGE} AS runtime
# DL3008 ignored as in the build stage (the release fixes python3's version).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 kiln \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/kiln --shell /usr/sbin/nologin kiln \
    && mkdir -p /models /engines /var/cache/kiln \
    && chown kiln:kiln /engines /var/cache/kiln

COPY --from=build /opt/kiln /opt/kiln
# The shipped demo model (kiln-shapes); mount real model folders over /models.
COPY models /models

# Every `kiln serve` setting is also KILN_<NAME>: these make the image listen on all
# addresses (it then refuses to start without KILN_API_TOKENS), serve Prometheus metrics and
# a plaintext grpc.health.v1 port (kubelet's gRPC probes and the HEALTHCHECK below cannot
# speak TLS, which the main port may), whatever command a `docker run` gives.
ENV PATH=/opt/kiln/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/kiln \
    HF_HUB_OFFLINE=1 \
    KILN_MODELS_DIR=/models \
    KILN_CACHE_DIR=/var/cache/kiln \
    KILN_HOST=0.0.0.0 \
    KILN_PORT=50051 \
    KILN_HEALTH_PORT=50052 \
    KILN_METRICS_PORT=8002

USER 10001:10001
WORKDIR /home/kiln
VOLUME ["/models", "/engines", "/var/cache/kiln"]
# gRPC (kiln.v1 + health + reflection), plaintext health only, Prometheus /metrics.
EXPOSE 50051 50052 8002

# SERVING only once models are loaded and warm: real SDXL engines take minutes, hence the
# long start period. Health is NOT_SERVING while draining on SIGTERM too.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import grpc,os,sys;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;c=grpc.insecure_channel('127.0.0.1:'+os.environ.get('KILN_HEALTH_PORT','50052'));sys.exit(0 if g.HealthStub(c).Check(h.HealthCheckRequest(),timeout=4).status==h.HealthCheckResponse.SERVING else 1)"]

# Draining: SIGTERM turns health NOT_SERVING and lets requests finish (--drain-timeout, 60 s
# by default): give `docker stop` a longer --time.
STOPSIGNAL SIGTERM
CMD ["kiln", "serve"]
