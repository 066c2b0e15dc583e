"""Fixtures of the trainer tests that the shared ones (tests/fixtures) do not build."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, Qwen2MoeConfig

from roma_models.tiny import build_tokenizer, random_model


@pytest.fixture(scope="session")
def tiny_qwen2_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-layer Qwen2-MoE: layers 0-2 dense (``mlp_only_layers``), 3-5 MoE with 8 experts
    top-2 and a shared expert; even layers use a 4-token sliding window, odd ones full
    attention, so ``config.layer_types`` is not the same list from every starting layer."""
    out = tmp_path_factory.mktemp("qwen2-moe")
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(out))
    config = Qwen2MoeConfig(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=6,
        num_attention_heads=2, num_key_value_heads=1, intermediate_size=256,
        moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=8,
        num_experts_per_tok=2, mlp_only_layers=[0, 1, 2], use_sliding_window=True,
        sliding_window=4, max_window_layers=6, max_position_embeddings=512,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    random_model(config, seed=0).save_pretrained(out)
    assert len(set(config.layer_types)) == 2
    return out
