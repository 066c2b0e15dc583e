"""benchmarks/cuda_slot_gate.py, the CUDA-graph check of the stacked slot gate, run here on the
CPU (eagerly: the same code path without the graphs) so that a session lent a GPU can trust
what it reports: it passes on the real gate, fails when loads do not reach the weights the
forward reads, and its PyTorch MoE layer computes what a per-token loop computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.cuda_slot_gate import MoELayer, _layer, check, cost
from roma_service.engine.slot_gate import SlotGate

SMALL = {"hidden": 64, "experts": 8, "intermediate": 32, "top_k": 2}
CPU = torch.device("cpu")


def test_the_check_passes_on_the_slot_gate() -> None:
    layer = _layer(**SMALL, device=CPU, dtype=torch.float32)
    with torch.inference_mode():
        result, _ = check(layer, sizes=[1, 5, 16], steps=80)
    assert result.passed, result
    assert result.worst_error <= 1e-5
    assert {"load", "free", "swap base"} <= set(result.events)
    assert not result.graphs


def test_the_check_fails_when_a_load_does_not_reach_the_stack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stale weight (what a graph holding an old address would read) is an error of order 1."""
    monkeypatch.setattr(SlotGate, "_set", lambda self, slot, content: None)
    layer = _layer(**SMALL, device=CPU, dtype=torch.float32)
    with torch.inference_mode():
        result, _ = check(layer, sizes=[4, 16], steps=40)
    assert not result.passed
    assert result.worst_error > 0.1


def _loop(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    probs = F.linear(x, layer.router.weight).softmax(-1)
    for t in range(x.shape[0]):
        weights, chosen = probs[t].topk(layer.top_k)
        for w, e in zip(weights, chosen, strict=True):
            gate, up = (x[t] @ layer.w13[e]).chunk(2)
            out[t] += w * ((F.silu(gate) * up) @ layer.w2[e])
    return out


@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_the_moe_layer_computes_what_a_loop_over_tokens_does(tokens: int) -> None:
    layer = _layer(**SMALL, device=CPU, dtype=torch.float32)
    x = torch.randn(tokens, SMALL["hidden"])
    out, logits = layer(x)
    torch.testing.assert_close(logits, F.linear(x, layer.router.weight))
    torch.testing.assert_close(out, _loop(layer, x), rtol=1e-4, atol=1e-5)


def test_cost_times_both_modes_on_every_size() -> None:
    layer = _layer(**SMALL, device=CPU, dtype=torch.float32)
    with torch.inference_mode():
        rows = cost(layer, sizes=[1, 8], reps=2, rounds=2)
    assert [row.tokens for row in rows] == [1, 8]
    assert all(row.plain_us > 0 and row.slots_us > 0 for row in rows)
