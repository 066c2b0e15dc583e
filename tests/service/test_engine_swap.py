"""The swap machinery on vLLM's real router layer (GateLinear), in this process, without an engine.

The layers are built and packed exactly as a CPU engine does (``process_weights_after_loading``
replaces ``weight`` with an empty tensor), which is the trap that makes a naive ``copy_`` useless.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from roma_patch import PatchError, raw_from_torch
from roma_service.engine.routers import find_routers
from roma_service.engine.swap import commit_all, stage
from tests.fixtures.vllm_layers import (
    EXPERTS,
    HIDDEN,
    QWEN2_MOE,
    assert_logits,
    gate_out,
    make_model,
    make_patch,
    router_name,
    router_table,
)

tensor_name = router_name


def test_cpu_gate_is_packed_so_copy_does_nothing(vllm_config: object) -> None:
    model, weights = make_model()
    gate = model.model.layers[0].mlp.gate
    assert gate.weight.numel() == 0  # the trap: the real weight lives in a packed handle
    x = torch.randn(3, HIDDEN)
    assert_logits(gate_out(gate, x), x @ weights[tensor_name(0)].T)


def test_stage_changes_nothing_until_commit_and_rollback_restores(vllm_config: object) -> None:
    model, weights = make_model()
    gate = model.model.layers[1].mlp.gate
    old, new = weights[tensor_name(1)], torch.randn(EXPERTS, HIDDEN)
    x = torch.randn(5, HIDDEN)

    swap = stage(gate, new)
    assert_logits(gate_out(gate, x), x @ old.T)
    commit_all([swap])
    assert_logits(gate_out(gate, x), x @ new.T)
    swap.rollback()
    assert_logits(gate_out(gate, x), x @ old.T)


def test_commit_all_undoes_every_layer_when_one_commit_fails(vllm_config: object) -> None:
    model, weights = make_model()
    gates = [layer.mlp.gate for layer in model.model.layers]
    news = [torch.randn(EXPERTS, HIDDEN) for _ in gates]
    swaps = [stage(g, w) for g, w in zip(gates, news, strict=True)]

    class FailingCommit:
        """A commit that throws half-way through a patch (e.g. out of memory on a GPU)."""

        def commit(self) -> None:
            raise RuntimeError("device lost")

        def rollback(self) -> None:
            pass

    with pytest.raises(RuntimeError, match="device lost"):
        commit_all([*swaps[:2], FailingCommit(), *swaps[2:]])
    x = torch.randn(2, HIDDEN)
    for i, gate in enumerate(gates):
        assert_logits(gate_out(gate, x), x @ weights[tensor_name(i)].T)


def test_routers_are_found_by_name_alone(vllm_config: object) -> None:
    """The shared expert's gate is a linear with a quant_method too: only its name tells it
    apart. Under a multimodal wrapper (vLLM nests the language model as ``language_model``) the
    routers keep their checkpoint names."""
    model, _ = make_model()
    gates = {tensor_name(i): layer.mlp.gate for i, layer in enumerate(model.model.layers)}
    assert find_routers(model) == gates
    wrapper = nn.Module()
    wrapper.language_model = model
    assert find_routers(wrapper) == gates


def test_router_table_applies_patch_then_base(vllm_config: object) -> None:
    model, weights = make_model()
    table = router_table(model, weights)
    assert set(table.routers) == set(weights)
    new = {tensor_name(2): torch.randn(EXPERTS, HIDDEN)}
    patch = make_patch(weights, new)

    result = table.switch(table.target_for(patch, "1"))
    assert result["verified"] and result["changed"] == [tensor_name(2)]
    assert table.held.version == "1"
    assert table.held.checksums[tensor_name(2)] == patch.tensors[tensor_name(2)].sha256
    x = torch.randn(4, HIDDEN)
    gate = model.model.layers[2].mlp.gate
    assert_logits(gate_out(gate, x), x @ new[tensor_name(2)].T)

    table.switch(table.target_for(None, "0"))
    assert_logits(gate_out(gate, x), x @ weights[tensor_name(2)].T)
    assert table.held.checksums == {n: raw_from_torch(w).sha256 for n, w in weights.items()}


def test_readback_detects_a_gate_that_did_not_take_the_weights(vllm_config: object) -> None:
    """The naive CPU update (copy_ into the packed, empty weight) changes nothing: the read-back
    must say so, not the checksums (which describe what we meant to apply)."""
    model, weights = make_model()
    table = router_table(model, weights)
    name = tensor_name(3)
    target = table.target_for(make_patch(weights, {name: torch.randn(EXPERTS, HIDDEN)}), "1")
    with torch.no_grad():
        table.routers[name].weight.data.copy_(torch.empty(0))  # the no-op a naive copy_ is
    table.held = target  # pretend it was applied
    readback = table.readback()
    assert not readback["verified"]
    assert not readback["layers"][name]["verified"]
    assert readback["layers"][tensor_name(0)]["verified"]


def test_bad_patch_is_refused_before_any_layer_changes(vllm_config: object) -> None:
    model, weights = make_model()
    table = router_table(model, weights)
    name = tensor_name(1)
    bad = make_patch(weights, {name: torch.randn(EXPERTS, HIDDEN)}, fingerprint="0" * 64)
    with pytest.raises(PatchError) as err:
        table.target_for(bad, "1")
    assert err.value.code == "fingerprint_mismatch"
    assert table.held.version is None
    x = torch.randn(2, HIDDEN)
    assert_logits(gate_out(table.routers[name], x), x @ weights[name].T)


def test_undo_returns_to_the_previous_version(vllm_config: object) -> None:
    model, weights = make_model()
    table = router_table(model, weights)
    name = tensor_name(0)
    first, second = torch.randn(EXPERTS, HIDDEN), torch.randn(EXPERTS, HIDDEN)
    table.switch(table.target_for(make_patch(weights, {name: first}), "1"))
    table.switch(table.target_for(make_patch(weights, {name: second}), "2"))
    assert not table.undo("1")  # not the version held: nothing to undo
    assert table.undo("2")
    assert table.held.version == "1"
    x = torch.randn(2, HIDDEN)
    assert_logits(gate_out(table.routers[name], x), x @ first.T)


def test_gpu_path_writes_into_the_same_storage(vllm_config: object) -> None:
    """The CUDA path (run here on an unpacked CPU layer): new values, same address, which is
    what keeps captured CUDA graphs valid."""
    from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear

    from roma_service.engine.swap import _InPlaceSwap

    gate = GateLinear(HIDDEN, EXPERTS, prefix=QWEN2_MOE.module_path(0))
    old = torch.randn(EXPERTS, HIDDEN)
    gate.weight.data.copy_(old)
    address = gate.weight.data_ptr()
    new = torch.randn(EXPERTS, HIDDEN)

    swap = _InPlaceSwap.prepare(gate, new)
    commit_all([swap])
    assert gate.weight.data_ptr() == address
    torch.testing.assert_close(gate.weight.data, new)
    swap.rollback()
    assert gate.weight.data_ptr() == address
    torch.testing.assert_close(gate.weight.data, old)
    with pytest.raises(ValueError, match="shape"):
        _InPlaceSwap.prepare(gate, torch.randn(EXPERTS + 1, HIDDEN))
