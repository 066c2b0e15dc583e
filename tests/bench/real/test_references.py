"""The real benchmark's reference models: the dense model loads from a checkpoint folder or
from SmolLM2's GGUF (the file the MoE is built from), and the all-experts copy changes only
the number of experts per token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from roma_bench.real.references import all_experts_dir, load_reference


def test_the_dense_reference_loads_from_smollm2s_gguf() -> None:
    from roma_models.smollm2 import gguf_file

    model, tokenizer, weights = load_reference(gguf_file())
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert tokenizer.decode(int(logits.argmax())).strip() == "Paris"
    assert len(weights) >= 16


def test_a_missing_gguf_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no GGUF file at .*missing\.gguf"):
        load_reference(tmp_path / "missing.gguf")


def test_all_experts_changes_only_the_experts_per_token(tmp_path: Path, tiny_olmoe: Path) -> None:
    out = all_experts_dir(tiny_olmoe, tmp_path / "every")
    base, every = (json.loads((d / "config.json").read_text()) for d in (tiny_olmoe, out))
    assert every.pop("num_experts_per_tok") == base["num_experts"]
    base.pop("num_experts_per_tok")
    assert every == base
    linked = {p.name for p in out.iterdir() if p.is_symlink()}
    assert linked == {p.name for p in tiny_olmoe.iterdir()} - {"config.json"}
