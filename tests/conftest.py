"""Shared fixtures live in tests/fixtures/, one module per resource, so that each part of the
suite owns its own file: models (tiny checkpoints), redis (a real server), engine (a real vLLM
engine on the CPU, started once per session)."""

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.redis",
    "tests.fixtures.engine",
    "tests.fixtures.vllm_layers",
]


def pytest_configure(config: object) -> None:
    """Models the suite builds (the default model, if a test ever reaches it) go into a folder
    of the run's own, never the user's ~/.cache/roma/models."""
    import os
    import tempfile

    os.environ["ROMA_MODELS_DIR"] = tempfile.mkdtemp(prefix="roma-test-models-")


def pytest_unconfigure(config: object) -> None:
    import os
    import shutil

    shutil.rmtree(os.environ.get("ROMA_MODELS_DIR", ""), ignore_errors=True)
