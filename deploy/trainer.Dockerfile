# syntax=docker/dockerfile:1
# The trainer: `roma-train`, with CUDA torch by default.
#
# torch wheels from the PyTorch index carry their own CUDA runtime libraries, so a plain Python
# base image is enough: the host only needs the NVIDIA driver and container toolkit. For hosts
# without a GPU, docker-compose.cpu.yml builds this same file with
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu and TORCH_SPEC=torch==2.13.0+cpu.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu129
ARG TORCH_SPEC=torch==2.13.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/root/.cache/huggingface

# torch first, from its own index, so that resolving the project's `torch>=...` finds it already
# satisfied and does not fetch PyPI's default build.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /opt/roma
# pyproject.toml and every folder it maps to a package (`pip install .` builds them all,
# the benchmark's too).
COPY pyproject.toml ./
COPY patch ./patch
COPY models ./models
COPY service ./service
COPY trainer ./trainer
COPY benchmarks/quality ./benchmarks/quality
RUN pip install --no-cache-dir . \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && python -c "import torch, roma_trainer; print(torch.__version__)"

# The GPU recipe (device: cuda); `roma-train train -c /etc/roma/train-cuda.yaml ...`.
COPY deploy/trainer/cuda.yaml /etc/roma/train-cuda.yaml

VOLUME ["/data", "/runs"]
WORKDIR /runs
ENTRYPOINT ["roma-train"]
