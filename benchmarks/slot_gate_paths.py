"""Which of the grouped slot gate's two mixed-step paths is cheaper, by router size and tokens:
the rule behind ``STACKED_MIXED_MAX_MACS`` (service/engine/slot_gate.py).

    python benchmarks/slot_gate_paths.py
    python benchmarks/slot_gate_paths.py --size 2048x64 --tokens 16 --rounds 30

A mixed step (tokens of several router versions in one forward) runs either
* **stacked**: one GEMM of every token against all slots' weights, through the layer's own
  packed kernel built over the stacked weights, then a ``take`` of each token's own slot's
  logits: ``slots`` times the multiply-adds, a fixed two calls; or
* **per slot**: slot 0's GEMM over all tokens, then for each other slot with tokens a GEMM on
  its rows and a scatter back: the plain work, plus a kernel call, a gather and a scatter per slot.

Both are timed on the same vLLM router (GateLinear, packed as a CPU engine packs it), 4 slots
(base + 3 patches), the step's tokens spread evenly over the slots, in this process pinned to
one core with one thread, alternating round by round; medians over rounds. The last column is
the stacked GEMM's multiply-adds (tokens x slots x experts x hidden): where the ratio crosses 1
is where the rule puts its threshold.
"""

from __future__ import annotations

import os
import statistics
import sys
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
SIZES = ["128x8", "512x64", "1024x64", "2048x64", "2048x128"]
TOKENS = [4, 16, 64, 256]


def _size(text: str) -> tuple[int, int]:
    hidden, _, experts = text.partition("x")
    if not (hidden.isdigit() and experts.isdigit()):
        raise typer.BadParameter(f"HIDDENxEXPERTS, e.g. 2048x64, not {text!r}")
    return int(hidden), int(experts)


@app.command()
def main(
    size: Annotated[list[str], typer.Option(help="router HIDDENxEXPERTS (repeatable)")] = SIZES,
    tokens: Annotated[list[int], typer.Option(help="tokens per mixed step (repeatable)")] = TOKENS,
    rounds: int = 15,
    calls: Annotated[int, typer.Option(help="gate calls per round and path")] = 100,
    core: Annotated[int | None, typer.Option(help="default: the last core allowed")] = None,
) -> None:
    from vllm.forward_context import set_forward_context
    from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear

    from roma_service.engine import slot_gate
    from roma_service.engine.slot_gate import SlotGate, StepSlots

    sizes = [_size(s) for s in size]
    if min(tokens) < 2:
        raise typer.BadParameter("a mixed step has 2 tokens or more", param_hint="--tokens")
    pinned = core if core is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {pinned})
    torch.set_num_threads(1)
    table = Table(title=f"grouped slot gate, mixed steps: {SLOTS} slots, core {pinned}, "
                  f"{rounds} rounds x {calls} calls, medians")  # fmt: skip
    for column in ("router", "tokens", "stacked us", "per slot us", "stacked / per slot",
                   "stacked multiply-adds"):  # fmt: skip
        table.add_column(column, justify="right")
    for hidden, experts in sizes:
        # A context per size: vLLM names each layer once per config.
        with vllm_worker_context() as config, torch.inference_mode():
            torch.manual_seed(0)
            router = GateLinear(hidden, experts, prefix="model.layers.0.mlp.gate")
            router.weight.data.normal_(std=0.02)
            base = router.weight.detach().clone()
            router.quant_method.process_weights_after_loading(router)
            gates = {}
            for path, limit in (("stacked", max(tokens)), ("per slot", 0)):
                step = StepSlots(SLOTS, max(tokens), torch.device("cpu"), "grouped")
                router.__dict__.pop("forward", None)
                gate = SlotGate(path, router, step, "grouped", base)
                gate.stack_tokens = limit  # before staging: it decides whether a twin is packed
                for slot in range(1, SLOTS):  # patches that differ from the base
                    gate.stage(slot, base * (slot + 1)).commit()
                gates[path] = (gate, step)
            for n in tokens:
                x = torch.randn(n, hidden) * 0.5
                spread = np.arange(n, dtype=np.int64) % SLOTS
                times: dict[str, list[float]] = {path: [] for path in gates}
                with set_forward_context(None, config, num_tokens=n):
                    for r in range(rounds):
                        order = list(gates) if r % 2 == 0 else list(reversed(gates))
                        for path in order:
                            gate, step = gates[path]
                            step.mixed(spread, n)
                            gate.logits(x)  # what a step works out once
                            times[path].append(time_us(gate.logits, x, calls))
                stacked = statistics.median(times["stacked"])
                per_slot = statistics.median(times["per slot"])
                table.add_row(f"{hidden} x {experts}", str(n), f"{stacked:.1f}",
                              f"{per_slot:.1f}", f"{stacked / per_slot:.2f}",
                              f"{n * SLOTS * hidden * experts:.2e}")  # fmt: skip
    Console().print(table)
    Console().print(
        f"STACKED_MIXED_MAX_MACS = {slot_gate.STACKED_MIXED_MAX_MACS:.2e}: mixed steps at or under "
        "it stack, larger ones run a GEMM per slot."
    )


if __name__ == "__main__":
    app()
