"""The reference models a real benchmark reports beside the methods: the MoE with every expert
on (built on the fly from the checkpoint: only ``num_experts_per_tok`` changes) and, when given,
the dense model the MoE was made from."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from roma_bench.runs import weights_fingerprint

# Config keys of the number of routed experts, by family (OLMoE/Qwen-MoE, DeepSeek).
_EXPERT_KEYS = ("num_experts", "n_routed_experts")


def all_experts_dir(model: Path, out: Path) -> Path:
    """A copy of ``model`` whose config routes every token to every expert: its files linked,
    ``config.json`` rewritten with ``num_experts_per_tok`` = the number of experts."""
    config = json.loads((model / "config.json").read_text())
    key = next((k for k in _EXPERT_KEYS if k in config), None)
    if key is None or "num_experts_per_tok" not in config:
        raise ValueError(f"{model}/config.json names no routed experts ({', '.join(_EXPERT_KEYS)})")
    out.mkdir(parents=True, exist_ok=True)
    for path in model.iterdir():
        link = out / path.name
        if path.name != "config.json" and not link.exists():
            link.symlink_to(path.resolve())
    (out / "config.json").write_text(json.dumps(config | {"num_experts_per_tok": config[key]}))
    return out


def load_reference(path: Path) -> tuple[torch.nn.Module, object, str]:
    """Any causal LM (dense or MoE) in eval mode, its tokenizer and its weights' fingerprint:
    a checkpoint folder, or a GGUF file (dequantised to float32, as `roma-models build` reads
    SmolLM2's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        where, gguf = str(path.parent), {"gguf_file": path.name}
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **gguf)
    else:
        where, gguf = str(path), {}
        model = AutoModelForCausalLM.from_pretrained(where, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(where, **gguf)
    return model.eval(), tokenizer, weights_fingerprint(model)
