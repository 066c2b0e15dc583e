"""MoEfy a dense Llama-style model end to end: calibrate, cut, fit the routers, assemble.

:mod:`roma_models.moefy` holds the cut and the checkpoint layout, :mod:`roma_models.router_fit`
the calibration text and the router training; this module runs them in order for every MoE
layer. Any dense ``LlamaForCausalLM`` works (the tests use a tiny one; ``roma-models build
smollm2-moe`` the real SmolLM2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from roma_models.moefy import (
    ROUTER_LOGIT_BOUND_LOG2,
    LayerSplit,
    MoeShape,
    assemble,
    initial_router,
    router_scale,
    split_layer,
    top_k_ties,
)
from roma_models.router_fit import (
    RouterFit,
    expert_gram,
    ffn_inputs,
    fit_router,
    generate_calibration,
)


@dataclass
class Calibration:
    """Dense-model text and, for each layer that may become MoE, its FFN inputs on it."""

    sequences: list[list[int]]
    inputs: dict[int, torch.Tensor]

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def calibrate(
    dense: nn.Module, tokenizer, layers: list[int], seed: int = 0, **generation: int
) -> Calibration:
    sequences = generate_calibration(dense, tokenizer, seed=seed, **generation)
    return Calibration(sequences, ffn_inputs(dense, sequences, layers))


@dataclass
class LayerReport:
    split: LayerSplit
    fit: RouterFit
    scale: float  # the power of two the router rows were multiplied by
    ties: int  # calibration tokens whose top-k choice is a float32 tie (see moefy.top_k_ties)


@torch.no_grad()
def moefy(
    dense: nn.Module,
    shape: MoeShape,
    calibration: Calibration,
    seed: int = 0,
    train_steps: int = 1000,
    log: Callable[[str], None] = lambda _: None,
    logit_bound_log2: int = ROUTER_LOGIT_BOUND_LOG2,
) -> tuple[nn.Module, dict[int, LayerReport]]:
    """The Qwen2-MoE model of ``dense`` cut as ``shape``, with trained routers scaled so that
    no logit on the calibration tokens exceeds 2^``logit_bound_log2``."""
    shape.expert_size(dense.config.intermediate_size)  # refuse a bad cut before any work
    reports: dict[int, LayerReport] = {}
    routers: dict[int, torch.Tensor] = {}
    for layer in shape.layers(dense.config.num_hidden_layers):
        mlp, x = dense.model.layers[layer].mlp, calibration.inputs[layer]
        split = split_layer(mlp, x, shape, seed)
        fit = fit_router(
            x,
            expert_gram(mlp, split, x),
            initial_router(mlp, split),
            shape.top_k,
            steps=train_steps,
            seed=seed,
        )
        scale = router_scale(fit.weight, x, logit_bound_log2)
        routers[layer] = fit.weight * scale
        ties = top_k_ties(routers[layer], x, shape.top_k)
        reports[layer] = LayerReport(split, fit, scale, ties)
        log(
            f"layer {layer}: error {fit.error_before:.3f} (mean gate rows) -> "
            f"{fit.error_after:.3f} (trained); {fit.error_best:.3f} with each token's best "
            "experts; "
            f"busiest expert {fit.load_max:.2f}x an even share; "
            f"{ties} of {len(x)} tokens with a float32 top-k tie"
        )
    splits = {layer: report.split for layer, report in reports.items()}
    return assemble(dense, shape, splits, routers), reports
