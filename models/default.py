"""The embedded default model: what ``roma-serve`` and ``roma-train`` use with no ``--model``."""

from __future__ import annotations

import os
from pathlib import Path

# The routing-gap benchmark's pretrained tiny OLMoE, committed with the package when present.
BUNDLED = Path(__file__).parent / "assets" / "bench-olmoe"


def cache_root() -> Path:
    """``$ROMA_CACHE_DIR``, else ``~/.cache/roma``: where built models are kept."""
    return Path(os.environ.get("ROMA_CACHE_DIR", Path.home() / ".cache" / "roma"))


def default_model_dir() -> Path:
    """The bundled benchmark model, or else a tiny random OLMoE built once into the cache."""
    if (BUNDLED / "config.json").exists():
        return BUNDLED
    from roma_models.tiny import build_tiny_model

    cache = cache_root() / "tiny-olmoe"
    if not (cache / "config.json").exists():
        build_tiny_model("olmoe", cache, seed=0)
    return cache
