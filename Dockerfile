# Kiln server image. On a GPU host build engines inside the container for that GPU:
#   docker build -t kiln .
#   docker run --gpus all -p 50051:50051 -v $PWD/engines:/app/engines kiln \
#       kiln build-engines --format tensorrt --out /app/engines
#   docker run --gpus all -p 50051:50051 -v $PWD/engines:/app/engines kiln \
#       kiln serve --host 0.0.0.0 --backend tensorrt --engines /app/engines
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    KILN_CACHE_DIR=/var/cache/kiln \
    KILN_MODELS_DIR=/app/models \
    HF_HUB_OFFLINE=1

WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml constraints.txt README.md ./
COPY protos protos
COPY server server
COPY build_engines build_engines
COPY clients clients
COPY training training
COPY models models
# torch is pinned by constraints.txt (PyPI's Linux wheel is the CUDA build a GPU host
# needs). TensorRT comes from NVIDIA's index: build with --build-arg WITH_TENSORRT=1.
ARG WITH_TENSORRT=0
RUN pip install --no-cache-dir -c constraints.txt . \
    && pip install --no-cache-dir --no-deps -c constraints.txt open_clip_torch \
    && if [ "$WITH_TENSORRT" = "1" ]; then \
        pip install --no-cache-dir --extra-index-url https://pypi.nvidia.com "tensorrt-cu12>=10,<11"; \
    fi

EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s \
    CMD python -c "import grpc,sys;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;c=grpc.insecure_channel('127.0.0.1:50051');sys.exit(0 if g.HealthStub(c).Check(h.HealthCheckRequest(),timeout=3).status==1 else 1)"
CMD ["kiln", "serve", "--host", "0.0.0.0"]
