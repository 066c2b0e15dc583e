# syntax=docker/dockerfile:1
# The gateway: the only public door. A slim Python image without vLLM, torch or CUDA.
#
# Its third-party packages come from deploy/requirements/gateway.txt (versions the test suite
# ran with) instead of the project's full dependency list, which also carries the trainer's
# torch/transformers stack; the project itself is then installed with --no-deps.
# tests/deploy/test_gateway_image.py checks that this list covers every module the gateway
# imports and that the gateway imports with torch unavailable.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/roma
COPY deploy/requirements/gateway.txt ./deploy/requirements/gateway.txt
RUN pip install --no-cache-dir -r deploy/requirements/gateway.txt

# pyproject.toml and every folder it maps to a package (`pip install .` builds them all,
# the benchmark's too).
COPY pyproject.toml ./
COPY patch ./patch
COPY models ./models
COPY service ./service
COPY trainer ./trainer
COPY benchmarks/quality ./benchmarks/quality
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import sys; sys.modules['torch'] = None; import roma_service.gateway"

RUN useradd --system --uid 10001 --home-dir /nonexistent roma
USER roma

ENV ROMA_HOST=0.0.0.0 \
    ROMA_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=6 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["roma-serve"]
