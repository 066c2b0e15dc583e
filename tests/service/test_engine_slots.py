"""Resident router versions, in this process, on vLLM's real router layer (GateLinear) and
vLLM's real per-request structures (InputBatch, CachedRequestState, SamplingParams with
extra_args), without an engine: the slot-aware gate of both strategies, the per-step binding of
requests to slots, and the slot table's load / free / pin / eviction rules.

The engine tests (test_engine_slots_serving.py) check the same things end to end against
transformers; these isolate each rule and run in seconds.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from roma_service.engine import slot_gate
from roma_service.engine.expert_load import ExpertLoad
from roma_service.engine.slot_gate import SlotGate, StepSlots
from roma_service.engine.slots import BOUND_ATTR, SlotRefused, SlotTable, choose_strategy
from roma_service.engine.swap import _InPlaceSwap, commit_all, packed_twin
from tests.fixtures.vllm_layers import (
    EXPERTS,
    HIDDEN,
    LAYERS,
    assert_logits,
    gate_out,
    make_model,
    make_patch,
    router_name,
    router_table,
)

pytestmark = pytest.mark.usefixtures("vllm_config")
SLOTS = 4


def _gates(model: nn.Module, weights: dict[str, torch.Tensor], strategy: str, tokens: int = 64):
    step = StepSlots(SLOTS, tokens, torch.device("cpu"), strategy)
    gates = {
        router_name(i): SlotGate(
            router_name(i), layer.mlp.gate, step, strategy, weights[router_name(i)]
        )
        for i, layer in enumerate(model.model.layers)
    }
    return step, gates


@pytest.mark.parametrize("strategy", ["grouped", "grouped, a GEMM per slot", "stacked"])
def test_each_token_uses_its_slots_routers(strategy: str) -> None:
    """Mixed steps: grouped runs small gates as one GEMM over all slots plus a take,
    larger ones as a GEMM per slot on its tokens; stacked always stacks."""
    model, weights = make_model(seed=1, packed=strategy != "stacked")
    step, gates = _gates(model, weights, strategy.split(",")[0])
    for gate in gates.values():
        gate.stack_tokens = 1 << 20 if strategy == "grouped" else 0
    name = router_name(2)
    gate = model.model.layers[2].mlp.gate
    w1, w3 = torch.randn(EXPERTS, HIDDEN), torch.randn(EXPERTS, HIDDEN)
    commit_all([gates[name].stage(1, w1)])
    staged = gates[name].stage(3, w3)
    if strategy != "stacked":  # grouped kernels are replaced whole: one staged change at a time
        with pytest.raises(RuntimeError, match="older"):
            commit_all([gates[name].stage(2, w1), staged])
    commit_all([staged])
    per_slot = {0: weights[name], 1: w1, 2: weights[name], 3: w3}  # slot 2: like slot 0

    x = torch.randn(10, HIDDEN)
    token_slots = np.array([0, 1, 1, 3, 2, 0, 3, 1, 2, 0])
    step.mixed(token_slots, tokens=len(token_slots))
    expected = torch.stack([x[t] @ per_slot[int(s)].T for t, s in enumerate(token_slots)])
    assert_logits(gate_out(gate, x), expected)

    for slot, weight in per_slot.items():
        step.uniform(slot, tokens=10)
        assert_logits(gate_out(gate, x), x @ weight.T)

    # Another mix of slots (what each step works out once is worked out again).
    again = np.array([3, 3, 0, 1, 2, 1])
    step.mixed(again, tokens=len(again))
    expected = torch.stack([x[t] @ per_slot[int(s)].T for t, s in enumerate(again)])
    assert_logits(gate_out(gate, x[: len(again)]), expected)

    # Tokens past the real ones (CUDA-graph padding) use slot 0.
    step.mixed(again, tokens=8)
    padded = [*again, 0, 0]
    expected = torch.stack([x[t] @ per_slot[int(s)].T for t, s in enumerate(padded)])
    assert_logits(gate_out(gate, x[:8]), expected)

    # Layers no slot patches compute like slot 0 for every token.
    step.mixed(token_slots, tokens=len(token_slots))
    other = model.model.layers[0].mlp.gate
    assert_logits(gate_out(other, x), x @ weights[router_name(0)].T)


def test_grouped_gate_stacks_mixed_steps_up_to_its_token_limit_then_a_gemm_per_slot() -> None:
    """The stacked GEMM does ``slots`` times the work: past ``stack_tokens`` the same gate runs a
    GEMM per slot on its tokens instead, and both give each token its own slot's logits."""
    model, weights = make_model(seed=4)
    step, gates = _gates(model, weights, "grouped")
    name = router_name(1)
    gates[name].stack_tokens = 4
    w2 = torch.randn(EXPERTS, HIDDEN)
    commit_all([gates[name].stage(2, w2)])
    per_slot = {0: weights[name], 1: weights[name], 2: w2, 3: weights[name]}
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(10, HIDDEN)
    for token_slots, stacked in ((np.array([2, 0, 2, 1]), True), (np.arange(10) % SLOTS, False)):
        step.mixed(token_slots, tokens=len(token_slots))
        n = len(token_slots)
        expected = torch.stack([x[t] @ per_slot[int(s)].T for t, s in enumerate(token_slots)])
        assert_logits(gate_out(gate, x[:n]), expected)
        # What the step worked out tells which path ran: flat indices or per-slot rows.
        assert bool(step._flat) is stacked
        assert (step._rows is None) is stacked


@pytest.mark.parametrize(("tokens_worth", "twin"), [(3, False), (4, True)])
def test_a_gate_keeps_a_stacked_twin_only_if_mixed_steps_of_4_tokens_could_use_it(
    monkeypatch: pytest.MonkeyPatch, tokens_worth: int, twin: bool
) -> None:
    """The stacked twin is packed anew on every slot load: a router so large that only mixed
    steps of 2 or 3 tokens would stack does without it."""
    macs = tokens_worth * SLOTS * EXPERTS * HIDDEN
    monkeypatch.setattr(slot_gate, "STACKED_MIXED_MAX_MACS", macs)
    model, weights = make_model(seed=5)
    _, gates = _gates(model, weights, "grouped")
    gate = gates[router_name(0)]
    assert gate.stack_tokens == (tokens_worth if twin else 0)
    commit_all([gate.stage(1, torch.randn(EXPERTS, HIDDEN))])
    assert (gate.kernels.stacked is not None) is twin


def test_grouped_forward_of_another_size_is_slot_0() -> None:
    """vLLM's profiling and warm-up forwards do not go through the step hook: slot 0."""
    model, weights = make_model(seed=2)
    step, gates = _gates(model, weights, "grouped")
    name = router_name(1)
    commit_all([gates[name].stage(1, torch.randn(EXPERTS, HIDDEN))])
    step.uniform(1, tokens=6)
    x = torch.randn(5, HIDDEN)
    assert_logits(gate_out(model.model.layers[1].mlp.gate, x), x @ weights[name].T)


def test_stacked_gate_keeps_its_addresses_and_slot_0_is_the_live_weight() -> None:
    """What keeps captured CUDA graphs valid (checked here on the CPU): loads copy into the
    stack and steps write the index buffer in place; slot 0 of the stack is the layer's weight,
    so the single-version swap (which copies into that weight) changes slot 0."""
    model, weights = make_model(seed=3, packed=False)
    step, gates = _gates(model, weights, "stacked")
    name = router_name(0)
    gate, slot_gate = model.model.layers[0].mlp.gate, gates[name]
    assert gate.weight.data_ptr() == slot_gate.stack[0].data_ptr()
    addresses = (slot_gate.stack.data_ptr(), step.index.data_ptr())

    w2 = torch.randn(EXPERTS, HIDDEN)
    commit_all([slot_gate.stage(2, w2)])
    step.mixed(np.array([2, 0, 2]), tokens=4)  # 4: one token of CUDA-graph padding
    assert step.index[:4].tolist() == [2, 0, 2, 0]
    x = torch.randn(4, HIDDEN)
    out = gate_out(gate, x)
    assert_logits(out[[0, 2]], x[[0, 2]] @ w2.T)
    assert_logits(out[[1, 3]], x[[1, 3]] @ weights[name].T)

    new_base = torch.randn(EXPERTS, HIDDEN)
    commit_all([_InPlaceSwap.prepare(gate, new_base)])
    step.uniform(0, tokens=4)
    assert_logits(gate_out(gate, x), x @ new_base.T)
    commit_all([slot_gate.stage(2, None)])  # freed: like the base again
    step.uniform(2, tokens=4)
    assert_logits(gate_out(gate, x), x @ weights[name].T)
    assert (slot_gate.stack.data_ptr(), step.index.data_ptr()) == addresses


def test_stacked_refuses_a_packed_layer() -> None:
    model, weights = make_model(seed=4, packed=True)
    with pytest.raises(ValueError, match="grouped"):
        _gates(model, weights, "stacked")


def test_compiled_forward_follows_the_step() -> None:
    """Under torch.compile the grouped gate runs as an opaque custom op: one graph, and every
    call computes with the slots of the step it runs in (a Python branch traced once would
    be frozen into the graph: vLLM drops Dynamo's guards)."""
    model, weights = make_model(seed=5)
    step, gates = _gates(model, weights, "grouped")
    name = router_name(3)
    gate = model.model.layers[3].mlp.gate
    w1 = torch.randn(EXPERTS, HIDDEN)
    commit_all([gates[name].stage(1, w1)])
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: gate_out(gate, x) * 1.0, backend="eager", fullgraph=True)
    x = torch.randn(6, HIDDEN)
    rows = torch.tensor([0, 2, 5])
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph for every step
        step.uniform(0, tokens=6)
        assert_logits(compiled(x), x @ weights[name].T)
        step.uniform(1, tokens=6)
        assert_logits(compiled(x), x @ w1.T)
        step.mixed(np.array([1, 0, 1, 0, 0, 1]), tokens=6)
        assert_logits(compiled(x)[rows], x[rows] @ w1.T)


def test_choose_strategy() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_strategy("auto", cpu, eager=False) == "grouped"
    assert choose_strategy("auto", cuda, eager=False) == "stacked"
    assert choose_strategy("auto", cuda, eager=True) == "grouped"
    assert choose_strategy("stacked", cpu, eager=True) == "stacked"
    with pytest.raises(ValueError, match="enforce-eager"):
        choose_strategy("grouped", cuda, eager=False)


# -- the slot table and request binding, on vLLM's own per-request structures ----------------


@dataclass
class Runner:
    """The three things of vLLM's model runner the slot table reads, as real vLLM objects."""

    input_batch: object = field(default=None)
    requests: dict[str, object] = field(default_factory=dict)
    query_start_loc: object = field(default=None)

    def __post_init__(self) -> None:
        from vllm.v1.utils import CpuGpuBuffer
        from vllm.v1.worker.gpu_input_batch import InputBatch

        cpu = torch.device("cpu")
        self.input_batch = InputBatch(
            max_num_reqs=8,
            max_model_len=64,
            max_num_batched_tokens=64,
            device=cpu,
            vocab_size=384,
            block_sizes=[16],
            max_num_blocks_per_req=[4],
        )
        self.query_start_loc = CpuGpuBuffer(9, dtype=torch.int32, device=cpu, pin_memory=False)

    def add(self, req_id: str, version: str | None) -> object:
        from vllm import SamplingParams
        from vllm.v1.worker.gpu_input_batch import CachedRequestState

        params = SamplingParams(
            max_tokens=4, extra_args=None if version is None else {"roma_version": version}
        )
        state = CachedRequestState(
            req_id=req_id,
            prompt_token_ids=[1, 2, 3],
            mm_features=[],
            sampling_params=params,
            generator=None,
            block_ids=([],),
            num_computed_tokens=0,
            output_token_ids=[],
        )
        self.requests[req_id] = state
        self.input_batch.add_request(state)
        return state

    def finish(self, req_id: str) -> None:
        self.requests.pop(req_id)
        self.input_batch.remove_request(req_id)
        self.input_batch.condense()
        self.input_batch.refresh_metadata()  # what the runner does once per step

    def step(self, table: SlotTable, tokens: Sequence[int]) -> None:
        """One step: ``tokens[i]`` tokens of the i-th request in batch order, as vLLM lays
        them out (query_start_loc), then the slot table's hook."""
        self.query_start_loc.np[0] = 0
        self.query_start_loc.np[1 : len(tokens) + 1] = np.cumsum(tokens)
        table.begin_step(int(sum(tokens)))


def _table(seed: int = 0, packed: bool = True):
    model, weights = make_model(seed=seed, packed=packed)
    runner = Runner()
    routers = router_table(model, weights)
    strategy = "grouped" if packed else "stacked"
    table = SlotTable(routers, runner, SLOTS, strategy, 64, torch.device("cpu"))
    return model, weights, runner, table


def _patch_for(weights: dict[str, torch.Tensor], layers: Sequence[int], seed: int):
    gen = torch.Generator().manual_seed(seed)
    new = {router_name(i): torch.randn(EXPERTS, HIDDEN, generator=gen) for i in layers}
    return new, make_patch(weights, new)


@pytest.mark.parametrize("packed", [True, False], ids=["grouped", "stacked"])
def test_requests_are_bound_to_their_versions_slot_for_life(packed: bool) -> None:
    model, weights, runner, table = _table(seed=6, packed=packed)
    new7, patch7 = _patch_for(weights, [1, 3], seed=7)
    loaded = table.load(patch7, "7")
    assert loaded["slot"] == 1 and loaded["verified"] and loaded["loaded"]

    base_req, v7_req, missing = runner.add("a", None), runner.add("b", "7"), runner.add("c", "9")
    runner.step(table, [3, 2, 1])
    assert [getattr(s, BOUND_ATTR) for s in (base_req, v7_req, missing)] == [0, 1, 0]
    assert table.misses == {"9": 1}
    x = torch.randn(6, HIDDEN)
    out = gate_out(model.model.layers[3].mlp.gate, x)
    assert_logits(out[3:5], x[3:5] @ new7[router_name(3)].T)
    assert_logits(out[[0, 1, 2, 5]], x[[0, 1, 2, 5]] @ weights[router_name(3)].T)
    assert table.describe()["slots"][1]["in_flight"] == 1

    # Loading 9 now does not move "c": bound when it was admitted, to its last token.
    table.load(_patch_for(weights, [3], seed=9)[1], "9")
    runner.step(table, [1, 1, 1])
    assert getattr(missing, BOUND_ATTR) == 0
    runner.finish("b")
    assert table.in_flight() == [2, 0, 0, 0]


@pytest.mark.parametrize("packed", [True, False], ids=["grouped", "stacked"])
def test_repeated_decode_steps_reuse_the_layout_until_the_batch_or_a_probe_changes_it(
    packed: bool,
) -> None:
    """A decode step whose requests use the slots the last one's did keeps what was worked out
    for it; a changed batch, a uniform step or a read-back probe between steps lays it out
    anew (the probe overwrites the stacked strategy's index buffer)."""
    model, weights, runner, table = _table(seed=13, packed=packed)
    new7, patch7 = _patch_for(weights, [2], seed=14)
    table.load(patch7, "7")
    gate, name = model.model.layers[2].mlp.gate, router_name(2)
    runner.add("a", "7")
    runner.add("b", None)
    runner.add("c", "7")

    def check(slots: list[int]) -> None:
        x = torch.randn(len(slots), HIDDEN)
        rows = [x[t] @ (new7 if slot == 1 else weights)[name].T for t, slot in enumerate(slots)]
        assert_logits(gate_out(gate, x), torch.stack(rows))

    runner.step(table, [1, 1, 1])
    check([1, 0, 1])
    laid_out = table.step.token_slots
    runner.step(table, [1, 1, 1])  # the same batch: nothing worked out again
    assert table.step.token_slots is laid_out
    check([1, 0, 1])

    table.describe(readback=True)  # a probe under every slot, between two steps
    runner.step(table, [1, 1, 1])
    assert table.step.token_slots is not laid_out
    check([1, 0, 1])

    runner.finish("b")
    runner.add("d", None)  # a changed batch: a, c, d
    runner.step(table, [1, 1, 1])
    check([1, 1, 0])
    runner.step(table, [2, 1, 1])  # not one token per request: laid out anew
    check([1, 1, 1, 0])
    runner.finish("d")
    runner.step(table, [1, 1])  # every token on slot 1
    check([1, 1])
    runner.add("e", None)
    runner.step(table, [1, 1, 1])
    check([1, 1, 0])


def test_load_is_idempotent_and_evicts_the_least_recently_used_idle_unpinned_slot() -> None:
    _, weights, runner, table = _table(seed=8)
    for version in ("1", "2", "3"):
        table.load(_patch_for(weights, [0], seed=int(version))[1], version)
    again = table.load(_patch_for(weights, [0], seed=1)[1], "1")
    assert again["slot"] == 1 and not again["loaded"]

    runner.add("r2", "2")
    runner.add("r3", "3")
    runner.step(table, [1, 1])  # 2 and 3 used now, 1 long ago; 2 still has a request
    runner.finish("r3")
    evicted = table.load(_patch_for(weights, [0], seed=4)[1], "4")
    assert (evicted["slot"], evicted["evicted"]) == (1, "1")

    table.pin("3", True)
    with pytest.raises(SlotRefused) as err:  # 2 busy, 3 pinned, 4 is the only idle one...
        table.load(_patch_for(weights, [0], seed=5)[1], "5", evict=False)
    assert err.value.code == "no_free_slot"
    assert table.load(_patch_for(weights, [0], seed=5)[1], "5")["evicted"] == "4"
    runner.finish("r2")
    assert table.slot_of("2") == 2


def test_free_refuses_a_busy_slot_unless_its_requests_move() -> None:
    model, weights, runner, table = _table(seed=10)
    new_a, patch_a = _patch_for(weights, [2], seed=11)
    table.load(patch_a, "11")
    table.load(_patch_for(weights, [2], seed=12)[1], "12")
    state = runner.add("r", "11")
    runner.step(table, [4])
    with pytest.raises(SlotRefused) as err:
        table.free("11")
    assert err.value.code == "slot_busy"
    with pytest.raises(SlotRefused) as err:
        table.free("0")
    assert err.value.code == "slot_pinned"

    freed = table.free("11", move_to="12")
    assert freed == {"slot": 1, "version": "11", "moved": 1, "recompute": True}
    assert getattr(state, BOUND_ATTR) == 2 and table.tainted == {"11"}
    reloaded = table.load(patch_a, "11")  # its salt may hold KV computed under 12: reset
    assert reloaded["reset_cache"] and not table.tainted
    runner.step(table, [1])
    x = torch.randn(1, HIDDEN)
    assert not torch.allclose(
        gate_out(model.model.layers[2].mlp.gate, x), x @ new_a[router_name(2)].T
    )


def test_slots_need_the_base_routers_in_slot_0() -> None:
    _, weights, _, table = _table(seed=13)
    _, patch = _patch_for(weights, [1], seed=14)
    table.routers.switch(table.routers.target_for(patch, "5"))  # the single-version swap
    with pytest.raises(SlotRefused) as err:
        table.load(_patch_for(weights, [1], seed=15)[1], "6")
    assert err.value.code == "slot0_not_base"
    assert table.describe()["slots"][0]["version"] == "5"
    table.routers.switch(table.routers.target_for(None, "0"))
    assert table.load(_patch_for(weights, [1], seed=15)[1], "6")["slot"] == 1


def test_readback_of_a_slot_sees_a_wrong_kernel() -> None:
    """The per-slot read-back runs the probe through the live gate under that slot: a slot
    whose kernel computes with other weights fails it."""
    _, weights, _, table = _table(seed=16)
    table.load(_patch_for(weights, [0, 3], seed=17)[1], "17")
    assert all(row.get("verified", True) for row in table.describe(readback=True)["slots"])
    gate = table.gates[router_name(3)]
    wrong = list(gate.kernels.per_slot)
    wrong[1] = packed_twin(gate.layer, torch.randn(EXPERTS, HIDDEN))
    gate.kernels = dataclasses.replace(gate.kernels, per_slot=tuple(wrong))
    rows = table.describe(readback=True)["slots"]
    assert rows[1]["verified"] is False and rows[0]["verified"] is True
    assert len(rows) == SLOTS and len(table.gates) == LAYERS


# -- expert load per version ---------------------------------------------------------------


TOP_K = 2


def _expert_load(table: SlotTable | None, routers=None) -> ExpertLoad:
    from transformers import Qwen2MoeConfig

    config = Qwen2MoeConfig(num_experts=EXPERTS, num_experts_per_tok=TOP_K)
    load = ExpertLoad(routers if table is None else table.routers, config, table)
    load.enable()
    return load


def _forward(model: nn.Module, x: torch.Tensor) -> None:
    """Every layer's router on ``x`` (what one model forward does to them)."""
    for layer in model.model.layers:
        gate_out(layer.mlp.gate, x)


def _routed(x: torch.Tensor, weights: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Expert counts of ``x`` routed by ``weights``, per router."""
    return {
        name: torch.bincount(
            (x @ w.T).topk(TOP_K, dim=-1).indices.reshape(-1), minlength=EXPERTS
        ).tolist()
        for name, w in weights.items()
    }


def _plus(*parts: dict[str, list[int]]) -> dict[str, list[int]]:
    return {n: [sum(col) for col in zip(*(p[n] for p in parts), strict=True)] for n in parts[0]}


@pytest.mark.parametrize("packed", [True, False], ids=["grouped", "stacked"])
def test_expert_load_is_counted_per_version_and_a_reloaded_slot_starts_from_zero(
    packed: bool,
) -> None:
    """Tokens of one mixed step go to their own request's version; freeing a slot and loading
    another version there leaves the old counts with the old version; probes never count."""
    model, weights, runner, table = _table(seed=20, packed=packed)
    new7, patch7 = _patch_for(weights, [0, 1, 2, 3], seed=21)
    new9, patch9 = _patch_for(weights, [0, 1, 2, 3], seed=22)
    assert table.load(patch7, "7")["slot"] == 1
    load = _expert_load(table)

    runner.add("a", None)
    runner.add("b", "7")
    runner.step(table, [3, 2])  # a mixed step: tokens 0-2 on slot 0, 3-4 on slot 1
    x = torch.randn(5, HIDDEN)
    _forward(model, x)
    runner.finish("b")
    runner.step(table, [1])  # a uniform step on slot 0
    y = torch.randn(1, HIDDEN)
    _forward(model, y)
    base7 = _routed(x[3:], new7)
    base0 = _plus(_routed(x[:3], weights), _routed(y, weights))

    table.free("7")
    assert table.load(patch9, "9")["slot"] == 1  # the same slot, another version
    table.describe(readback=True)  # the probe batch runs through every slot: not counted
    report = load.snapshot()
    assert set(report["versions"]) == {"0", "7"}
    assert report["versions"]["7"]["counts"] == base7
    assert report["versions"]["7"]["tokens"] == dict.fromkeys(weights, 2)
    assert report["versions"]["0"]["counts"] == base0
    assert report["versions"]["0"]["tokens"] == dict.fromkeys(weights, 4)

    runner.add("c", "9")
    runner.step(table, [1, 2])  # "a" again and "c", on slot 1 under version 9 now
    z = torch.randn(3, HIDDEN)
    _forward(model, z)
    report = load.snapshot(reset=True)
    assert report["versions"]["9"]["counts"] == _routed(z[1:], new9)
    assert report["versions"]["7"]["counts"] == base7  # kept, not inherited by 9
    assert report["versions"]["0"]["counts"] == _plus(base0, _routed(z[:1], weights))
    assert report["counts"] == _plus(*(v["counts"] for v in report["versions"].values()))
    assert load.snapshot()["versions"] == {}  # reset


def test_expert_load_without_slots_follows_the_single_version_swap() -> None:
    """No slot table (ROMA_ROUTER_SLOTS=1): everything counts for the held version, and a swap
    books what came before to the version held until then."""
    model, weights = make_model(seed=23)
    routers = router_table(model, weights)
    new5, patch5 = _patch_for(weights, [1, 3], seed=24)
    load = _expert_load(None, routers)
    x, y = torch.randn(4, HIDDEN), torch.randn(3, HIDDEN)
    _forward(model, x)
    routers.switch(routers.target_for(patch5, "5"))  # reads back: not counted
    _forward(model, y)
    report = load.snapshot()
    assert report["versions"]["0"]["counts"] == _routed(x, weights)
    assert report["versions"]["5"]["counts"] == _routed(y, {**weights, **new5})
    assert report["versions"]["5"]["tokens"] == dict.fromkeys(weights, 3)


def test_a_leased_version_is_neither_freed_nor_evicted_by_another_holder() -> None:
    _, weights, _, table = _table(seed=16)
    now = [100.0]
    table.clock = lambda: now[0]
    for version in ("1", "2", "3"):
        table.load(_patch_for(weights, [0], seed=int(version))[1], version)
    table.lease("1", 10.0, "gw-a")  # 1 is the least recently used: the first victim
    with pytest.raises(SlotRefused) as err:
        table.free("1", holder="gw-b")
    assert err.value.code == "slot_busy" and "leased" in err.value.message
    assert table.describe()["slots"][1]["leased_s"] == 10.0
    loaded = table.load(_patch_for(weights, [0], seed=4)[1], "4", lease_s=5.0, holder="gw-b")
    assert loaded["evicted"] == "2" and table.slot_of("1") == 1
    table.free("4", holder="gw-b")  # a holder's own lease does not hold it back

    now[0] += 10.0  # gw-a crashed: its lease runs out by itself
    assert table.leased("1") == 0.0 and "1" not in table.leases
    assert table.load(_patch_for(weights, [0], seed=5)[1], "5")["evicted"] is None  # 4's slot
    assert table.load(_patch_for(weights, [0], seed=6)[1], "6")["evicted"] == "1"

    table.lease("3", 10.0, "gw-a")
    table.lease("3", 0, "gw-a")  # released
    table.free("3", holder="gw-b")
    with pytest.raises(SlotRefused) as err:
        table.lease("3", 10.0, "gw-a")  # gone: the holder must load it again
    assert err.value.code == "unknown_version"


def test_a_leased_version_can_still_be_moved_off(tmp_path: Path) -> None:
    """A rollback that cannot wait frees a leased version with move_to: its requests on their
    way are redirected, and what the API server admits follows (admission.py)."""
    _, weights, runner, table = _table(seed=17)
    table.publish_to = tmp_path / "slots.json"
    table.load(_patch_for(weights, [1], seed=18)[1], "18")
    table.load(_patch_for(weights, [1], seed=19)[1], "19")
    table.lease("18", 10.0, "gw-a")
    assert json.loads(table.publish_to.read_text())["servable"] == ["0", "18", "19"]
    assert table.free("18", move_to="19", holder="gw-b")["slot"] == 1
    assert table.redirects == {"18": "19"} and not table.leases
    assert json.loads(table.publish_to.read_text())["servable"] == ["0", "18", "19"]
    table.free("19")
    assert json.loads(table.publish_to.read_text())["servable"] == ["0"]
    state = runner.add("late", "18")  # redirected to 19, which is gone too: a miss
    runner.step(table, [2])
    assert getattr(state, BOUND_ATTR) == 0 and table.misses == {"18": 1}
