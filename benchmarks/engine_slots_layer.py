"""Per-token cost of router slots in one MoE layer (vLLM's OLMoE block: gate + fused experts),
in this process, pinned to one core. Goal: 4 resident versions cost <= 1 % over vLLM's plain
gate.

    python benchmarks/engine_slots_layer.py                                # OLMoE-1B-7B layer
    python benchmarks/engine_slots_layer.py --hidden 128 --experts 8 --intermediate 64 --top-k 2

Modes, all on the same layer and weights, interleaved round by round (order rotated each round).
Every slot holds the base router's values, so every mode routes each token to the same experts
and the fused experts do identical work: what differs is the slot machinery alone.
* ``vLLM gate``: the layer as vLLM builds it (what ROMA_ROUTER_SLOTS=1 runs);
* ``4 slots, one version``: slots installed, 3 patches resident, every token of the forward on
  the same patched slot (the step's tokens share a version: the gate calls that slot's kernel);
* ``4 slots, mixed``: tokens spread evenly over the 4 versions (base + 3 patches);
* ``stacked, mixed``: the CUDA-graph strategy on the CPU (one GEMM against the stacked weights
  with torch's F.linear, then a gather), for reference: not what a CPU engine runs.

Each round times, per mode, ``--forwards`` forwards of the whole layer and ``--gate-calls``
calls of the gate alone, ``--tokens`` tokens each. The table gives medians over ``--rounds``
rounds: the layer's time, its ratio to the vLLM gate's (of medians, and the median of same-round
ratios), the gate's own time, and what the mode adds to the layer: (gate - vLLM gate) / layer
with the vLLM gate. The layer is memory-bound and long (tens of ms), so on a shared machine its
ratio swings by several percent from round to round; the gate's added time is measured on its
own, tightly, which is what the last column relies on.
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from engine_setup import time_us
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.fixtures
from tests.fixtures.vllm_layers import vllm_worker_context

app = typer.Typer(add_completion=False)
SLOTS = 4


def _moe_layer(
    hidden: int, experts: int, intermediate: int, top_k: int
) -> tuple[torch.nn.Module, torch.Tensor]:
    """vLLM's OLMoE MoE block with random weights, prepared as a CPU engine prepares it, and
    its router's weight (the packed router no longer holds it)."""
    from vllm.model_executor.models.olmoe import OlmoeMoE

    torch.manual_seed(0)
    moe = OlmoeMoE(experts, top_k, hidden, intermediate, prefix="model.layers.0.mlp")
    with torch.no_grad():
        for param in moe.parameters():
            param.normal_(std=0.02)
    router = moe.gate.weight.detach().clone()
    for module in moe.modules():
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)
    return moe, router


@app.command()
def main(
    hidden: int = 2048,
    experts: int = 64,
    intermediate: int = 1024,
    top_k: Annotated[int, typer.Option("--top-k")] = 8,
    tokens: Annotated[list[int], typer.Option(help="tokens per forward (repeatable)")] = [16, 256],  # noqa: B006
    forwards: int = 5,
    gate_calls: int = 200,
    rounds: int = 30,
    core: Annotated[int | None, typer.Option(help="default: the last core allowed")] = None,
) -> None:
    from vllm.forward_context import set_forward_context
    from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear

    from roma_service.engine.slot_gate import SlotGate, StepSlots

    pinned = core if core is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {pinned})
    torch.set_num_threads(1)
    with vllm_worker_context() as config, torch.inference_mode():
        moe, base = _moe_layer(hidden, experts, intermediate, top_k)
        gate = moe.gate
        # Every slot holds the base router's values (in its own kernel, which the slot gate
        # runs as for any patch): every mode routes every token to the same experts, so the
        # fused experts do the same work and the difference is the slot machinery alone.
        patches = [base.clone() for _ in range(SLOTS - 1)]
        grouped_step = StepSlots(SLOTS, max(tokens), torch.device("cpu"), "grouped")
        grouped = SlotGate("g", gate, grouped_step, "grouped", base)
        for slot, weight in enumerate(patches, 1):
            grouped.stage(slot, weight).commit()
        slot_forward = gate.forward
        unpacked = GateLinear(hidden, experts, prefix="model.layers.0.mlp.gate")
        unpacked.weight.data.copy_(base)
        stacked_step = StepSlots(SLOTS, max(tokens), torch.device("cpu"), "stacked")
        stacked = SlotGate("s", unpacked, stacked_step, "stacked", base)
        for slot, weight in enumerate(patches, 1):
            stacked.stage(slot, weight).commit()

        def mode(name: str, n: int) -> Callable[[], None]:
            """Put the layer in ``name``'s state for a forward of ``n`` tokens."""
            spread = np.arange(n, dtype=np.int64) % SLOTS

            def setup() -> None:
                moe.gate = gate
                gate.__dict__.pop("forward", None)
                if name == "vLLM gate":
                    return
                if name.startswith("stacked"):
                    moe.gate = unpacked
                    stacked_step.mixed(spread, n)
                    return
                gate.forward = slot_forward
                if name.endswith("one version"):
                    grouped_step.uniform(1, n)
                else:
                    grouped_step.mixed(spread, n)

            return setup

        names = ["vLLM gate", "4 slots, one version", "4 slots, mixed", "stacked, mixed"]
        console = Console()
        for n in tokens:
            x = torch.randn(n, hidden) * 0.5
            layer: dict[str, list[float]] = {name: [] for name in names}
            gate_only: dict[str, list[float]] = {name: [] for name in names}
            setups = {name: mode(name, n) for name in names}
            with set_forward_context(None, config, num_tokens=n):
                for name in names:  # warm-up
                    setups[name]()
                    moe(x)
                for r in range(rounds):
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        setups[name]()
                        layer[name].append(time_us(moe, x, forwards))
                        gate_only[name].append(time_us(moe.gate, x, gate_calls))
            title = (
                f"one MoE layer (hidden {hidden}, {experts} experts x {intermediate}, top-{top_k})"
                f", {n} tokens/forward, core {pinned}, {rounds} rounds"
            )
            console.print(_table(title, layer, gate_only, names))


def _table(
    title: str, layer: dict[str, list[float]], gate: dict[str, list[float]], names: list[str]
) -> Table:
    median = statistics.median
    base_layer, base_gate = median(layer[names[0]]), median(gate[names[0]])
    table = Table(title=title)
    columns = ("mode", "layer us", "ratio", "paired ratio", "gate us", "added / layer")
    for column in columns:
        table.add_column(column, justify="left" if column == "mode" else "right")
    for name in names:
        paired = [v / b for v, b in zip(layer[name], layer[names[0]], strict=True)]
        table.add_row(
            name,
            f"{median(layer[name]):.1f}",
            f"{median(layer[name]) / base_layer:.4f}",
            f"{median(paired):.4f}",
            f"{median(gate[name]):.2f}",
            f"{(median(gate[name]) - base_gate) / base_layer:+.3%}",
        )
    return table


if __name__ == "__main__":
    app()
