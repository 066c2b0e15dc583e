"""The family table: how each family names its routers, what must never pass for a router, and
detecting the family from a config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from roma_patch import (
    FAMILIES,
    Family,
    RouterRef,
    detect_family,
    router_layer,
    router_of_hf_module,
    router_of_tensor,
    router_of_vllm_module,
    router_patterns,
)
from roma_patch import families as families_module

# Modules and tensors beside the routers that share part of their name.
LOOK_ALIKES = [
    "model.layers.3.mlp.shared_expert_gate",  # Qwen2-MoE: [1, hidden], gates the shared expert
    "model.layers.3.mlp.shared_expert.gate_proj",
    "model.layers.3.mlp.gate_proj",  # a dense layer's MLP (DeepSeek's first layers)
    "model.layers.3.mlp.experts.0.gate_proj",
    "model.layers.3.mlp.gate.e_score_correction_bias",  # DeepSeek-V3, inside the router
    "model.layers.3.mlp.gates",
    "model.layers.x.mlp.gate",
    "model.layers.3.self_attn.gate",
    "lm_head",
]


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))
@pytest.mark.parametrize("layer", [0, 7, 23])
def test_names_round_trip(family: Family, layer: int) -> None:
    ref = RouterRef(layer, f"model.layers.{layer}.mlp.gate.weight")
    assert family.tensor_name(layer) == ref.tensor
    assert family.module_path(layer) == f"model.layers.{layer}.mlp.gate"
    assert router_of_tensor(ref.tensor) == ref
    assert router_layer(ref.tensor) == layer
    assert router_of_hf_module(family.module_path(layer), family) == ref
    assert router_of_vllm_module(f"model.layers.{layer}.mlp.gate", family) == ref


@pytest.mark.parametrize("name", LOOK_ALIKES)
@pytest.mark.parametrize("family", [None, *FAMILIES.values()], ids=["any", *FAMILIES])
def test_look_alikes_are_never_routers(name: str, family: Family | None) -> None:
    assert router_of_hf_module(name, family) is None
    assert router_of_vllm_module(name, family) is None
    assert router_of_tensor(f"{name}.weight", family) is None
    assert router_of_tensor(name, family) is None


def test_a_multimodal_prefix_is_accepted_in_vllm_only() -> None:
    """vLLM nests a multimodal model's language model (``language_model.model.layers...``); the
    checkpoint name stays the family's. transformers' paths are the checkpoint's names, so a
    prefix there would be another naming (a family entry of its own)."""
    expected = RouterRef(7, "model.layers.7.mlp.gate.weight")
    assert router_of_vllm_module("language_model.model.layers.7.mlp.gate") == expected
    assert router_of_vllm_module("model.language_model.layers.7.mlp.gate") == expected
    assert router_of_vllm_module("language_model.model.layers.7.mlp.shared_expert_gate") is None
    assert router_of_hf_module("model.language_model.layers.7.mlp.gate") is None
    assert router_of_tensor("model.language_model.layers.7.mlp.gate.weight") is None


def test_qwen2_moe_in_transformers_has_exactly_one_router_per_layer() -> None:
    """A real (tiny, random) transformers Qwen2-MoE: every ``mlp.gate`` is found, the
    ``shared_expert_gate`` beside it is not."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    config = Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    assert detect_family(model.config) is FAMILIES["qwen2_moe"]
    params = dict(model.named_parameters())
    assert "model.layers.0.mlp.shared_expert_gate.weight" in params  # the look-alike is there
    found = {n: router_of_tensor(n) for n in params if router_of_tensor(n)}
    assert sorted(found) == [f"model.layers.{i}.mlp.gate.weight" for i in range(3)]
    assert all(params[n].shape == (4, 32) for n in found)
    modules = [p for p, _ in model.named_modules() if router_of_hf_module(p, FAMILIES["qwen2_moe"])]
    assert modules == [f"model.layers.{i}.mlp.gate" for i in range(3)]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"model_type": "olmoe"}, "olmoe"),
        ({"model_type": "qwen2_moe"}, "qwen2_moe"),
        ({"model_type": "qwen3_moe"}, "qwen3_moe"),
        ({"model_type": "deepseek_v2"}, "deepseek_v2"),
        ({"model_type": "deepseek_v3"}, "deepseek_v3"),
        # DeepSeekMoE 16B ships its own code: its model_type and class are its own.
        ({"model_type": "deepseek", "architectures": ["DeepseekForCausalLM"]}, "deepseek_v2"),
        ({"architectures": ["Qwen2MoeForCausalLM"]}, "qwen2_moe"),
        ({"model_type": "custom", "architectures": ["OlmoeForCausalLM"]}, "olmoe"),
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, None),
        ({}, None),
    ],
)
def test_detect_family_from_config_json(config: dict, expected: str | None) -> None:
    family = detect_family(config)
    assert (family.name if family else None) == expected


def test_detect_family_from_transformers_configs() -> None:
    import transformers

    for name, cls in {
        "olmoe": transformers.OlmoeConfig,
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "deepseek_v2": transformers.DeepseekV2Config,
        "deepseek_v3": transformers.DeepseekV3Config,
    }.items():
        assert detect_family(cls()) is FAMILIES[name]
    assert detect_family(transformers.LlamaConfig()) is None
    assert detect_family(None) is None


def test_a_family_that_names_its_routers_apart_is_one_entry(monkeypatch) -> None:
    """Mixtral-style naming (``block_sparse_moe.gate``), with vLLM naming the module apart from
    transformers: once in the table, patch names, transformers and vLLM paths all follow."""
    other = Family(
        "moe_x",
        "MoE-X",
        ("moe_x",),
        ("MoeXForCausalLM",),
        router="layers.{layer}.block_sparse_moe.gate",
        vllm_router="layers.{layer}.moe.router",
    )
    name = "model.layers.2.block_sparse_moe.gate.weight"
    assert router_of_tensor(name) is None
    monkeypatch.setitem(families_module.FAMILIES, "moe_x", other)
    assert router_layer(name) == 2
    assert router_of_hf_module("model.layers.2.block_sparse_moe.gate") == RouterRef(2, name)
    assert router_of_vllm_module("language_model.model.layers.2.moe.router") == RouterRef(2, name)
    assert detect_family({"architectures": ["MoeXForCausalLM"]}) is other
    assert router_patterns() == (
        "model.layers.N.mlp.gate.weight or model.layers.N.block_sparse_moe.gate.weight"
    )
    # The usual families keep their own naming.
    assert router_of_tensor("model.layers.2.mlp.gate.weight") == RouterRef(
        2, "model.layers.2.mlp.gate.weight"
    )


def test_router_patterns_name_each_naming_once() -> None:
    assert router_patterns() == "model.layers.N.mlp.gate.weight"
    assert router_patterns("module") == "model.layers.N.mlp.gate"


def test_every_tiny_fixture_is_detected_as_its_family(tiny_models: dict[str, Path]) -> None:
    for fixture, path in tiny_models.items():
        config = json.loads((path / "config.json").read_text())
        assert detect_family(config) is FAMILIES[fixture], fixture
