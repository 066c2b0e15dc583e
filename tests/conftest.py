"""Shared fixtures live in tests/fixtures/, one module per resource, so that each part of the
suite owns its own file: models (tiny checkpoints), redis (a real server), engine (a real vLLM
engine on the CPU, started once per session)."""

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.redis",
    "tests.fixtures.engine",
    "tests.fixtures.vllm_layers",
]
