"""The MoE families roma supports and how each names its routers: the one table every side reads.

A router is the linear ``[num_experts, hidden]`` that scores the experts of one MoE layer. Its
name is the contract between the checkpoint, the patch, the trainer and the engine:

==================  ===========================================  =============================
where               name                                         read with
==================  ===========================================  =============================
checkpoint, patch   ``model.layers.N.mlp.gate.weight``            :func:`router_of_tensor`
transformers        ``model.layers.N.mlp.gate`` (a module path)   :func:`router_of_hf_module`
vLLM                ``model.layers.N.mlp.gate``; multimodal       :func:`router_of_vllm_module`
                    wrappers put their own path in front
                    (``language_model.model.layers.N.mlp.gate``)
==================  ===========================================  =============================

Look-alikes never match, because every pattern is anchored on the router's whole path: Qwen2-MoE's
``mlp.shared_expert_gate`` (``[1, hidden]``, a sigmoid gate on the shared expert, in transformers
and in vLLM), the dense layers' ``mlp.gate_proj`` (DeepSeek's first ``first_k_dense_replace``
layers have no router), DeepSeek-V3's ``mlp.gate.e_score_correction_bias``.

Adding a family is one :data:`FAMILIES` entry (plus whatever its engine needs, e.g. the plain
attention DeepSeek gets on the CPU in ``roma_service.engine.process``). Every family here names
its routers alike; a family that does not (Mixtral's ``block_sparse_moe.gate``, or a vLLM module
named apart from the checkpoint) sets ``router``/``vllm_router``/``checkpoint_prefix``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

_LAYER = "{layer}"


@dataclass(frozen=True)
class RouterRef:
    """One router: its MoE layer index and its checkpoint (and patch) tensor name."""

    layer: int
    tensor: str


@dataclass(frozen=True)
class Family:
    """One MoE architecture family and where its routers live.

    ``router`` is the router's module path below the language model's root, with ``{layer}``
    for the layer index; transformers' path (and the checkpoint's tensor names, ``.weight``
    added) is ``checkpoint_prefix + router``; vLLM's is ``vllm_router`` (default: ``router``)
    after any wrapper path.
    """

    name: str  # roma's key; the config's model_type where there is one
    title: str  # for people (docs, error messages)
    model_types: tuple[str, ...]  # config.json "model_type" values
    architectures: tuple[str, ...]  # config.json "architectures" (transformers and vLLM classes)
    router: str = "layers.{layer}.mlp.gate"
    checkpoint_prefix: str = "model."
    vllm_router: str | None = None

    def tensor_name(self, layer: int | str) -> str:
        """The checkpoint (and patch) name of layer ``layer``'s router weight."""
        return f"{self.module_path(layer)}.weight"

    def module_path(self, layer: int | str) -> str:
        """transformers' module path of layer ``layer``'s router."""
        return self.checkpoint_prefix + self.router.replace(_LAYER, str(layer))

    def router_of_tensor(self, name: str) -> RouterRef | None:
        return self._ref(self._tensor_re.match(name))

    def router_of_hf_module(self, path: str) -> RouterRef | None:
        return self._ref(self._hf_re.match(path))

    def router_of_vllm_module(self, path: str) -> RouterRef | None:
        return self._ref(self._vllm_re.search(path))

    def _ref(self, match: re.Match[str] | None) -> RouterRef | None:
        if match is None:
            return None
        layer = int(match.group(1))
        return RouterRef(layer, self.tensor_name(layer))

    @cached_property
    def _tensor_re(self) -> re.Pattern[str]:
        return re.compile(f"^{_pattern(self.tensor_name(_LAYER))}$")

    @cached_property
    def _hf_re(self) -> re.Pattern[str]:
        return re.compile(f"^{_pattern(self.module_path(_LAYER))}$")

    @cached_property
    def _vllm_re(self) -> re.Pattern[str]:
        return re.compile(rf"(?:^|\.){_pattern(self.vllm_router or self.router)}$")


def _pattern(template: str) -> str:
    return re.escape(template).replace(re.escape(_LAYER), r"(\d+)")


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("olmoe", "OLMoE", ("olmoe",), ("OlmoeForCausalLM",)),
        Family("qwen2_moe", "Qwen2-MoE", ("qwen2_moe",), ("Qwen2MoeForCausalLM",)),
        Family("qwen3_moe", "Qwen3-MoE", ("qwen3_moe",), ("Qwen3MoeForCausalLM",)),
        # DeepSeekMoE 16B (model_type "deepseek", its own modelling code) routes like V2, and
        # vLLM runs both with its deepseek_v2 module.
        Family(
            "deepseek_v2",
            "DeepSeek-V2",
            ("deepseek_v2", "deepseek"),
            ("DeepseekV2ForCausalLM", "DeepseekForCausalLM"),
        ),
        Family("deepseek_v3", "DeepSeek-V3", ("deepseek_v3",), ("DeepseekV3ForCausalLM",)),
    )
}


def supported_families() -> str:
    """The families' titles, for error messages: ``OLMoE, Qwen2-MoE, ...``."""
    return ", ".join(family.title for family in FAMILIES.values())


def router_patterns(kind: str = "tensor") -> str:
    """How routers are named (``kind``: ``tensor`` or ``module``), with N for the layer, e.g.
    ``model.layers.N.mlp.gate.weight``; families that name them alike are listed once."""
    names = (
        family.tensor_name("N") if kind == "tensor" else family.module_path("N")
        for family in FAMILIES.values()
    )
    return " or ".join(dict.fromkeys(names))


def detect_family(config: Mapping[str, Any] | Any) -> Family | None:
    """The family of a model config (a config.json mapping or a transformers/vLLM config
    object), by ``model_type`` and else by ``architectures``; None when it is none of ours."""
    if isinstance(config, Mapping):
        model_type, architectures = config.get("model_type"), config.get("architectures")
    else:
        model_type = getattr(config, "model_type", None)
        architectures = getattr(config, "architectures", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    for family in FAMILIES.values():
        if set(architectures or ()) & set(family.architectures):
            return family
    return None


def _candidates(family: Family | None) -> tuple[Family, ...]:
    return (family,) if family is not None else tuple(FAMILIES.values())


def router_of_tensor(name: str, family: Family | None = None) -> RouterRef | None:
    """A checkpoint or patch tensor name -> its router (None: not a router). Without
    ``family``, any family's naming counts (a patch does not say which model it is for)."""
    return next(filter(None, (f.router_of_tensor(name) for f in _candidates(family))), None)


def router_of_hf_module(path: str, family: Family | None = None) -> RouterRef | None:
    """A transformers module path (``model.named_modules()``) -> its router, or None."""
    return next(filter(None, (f.router_of_hf_module(path) for f in _candidates(family))), None)


def router_of_vllm_module(path: str, family: Family | None = None) -> RouterRef | None:
    """A vLLM module path -> its router (named as in the checkpoint), or None. Any wrapper path
    may come first (a multimodal model's ``language_model.``)."""
    return next(filter(None, (f.router_of_vllm_module(path) for f in _candidates(family))), None)
