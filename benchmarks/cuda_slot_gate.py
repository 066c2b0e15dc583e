"""Router slots under CUDA graphs, in plain PyTorch: the check and the per-token cost of the
``stacked`` strategy, the one a CUDA engine with captured graphs runs (docs/engine.md).

vLLM cannot be taken to the GPU machine this project is sometimes lent (its CUDA wheel is far
larger than what a run may carry), so this runs the part of a CUDA engine that slots change
without it: the project's own ``SlotGate`` and ``StepSlots`` (stacked) on a router
``nn.Linear``, in front of an MoE layer written in PyTorch (softmax, top-k, tokens sorted by
expert, the experts' two GEMMs as ``torch._grouped_mm``), captured in CUDA graphs once per batch
size, as vLLM captures its batches. What vLLM adds around it (its fused-MoE kernel, its model
runner's per-step hook, which calls ``StepSlots.uniform`` / ``mixed`` exactly as this does) is
covered by the CPU engine tests.

1. **check**: graphs are captured once; then, between replays, slots are loaded and freed and
   slot 0 (the live weight) is swapped in place, and each step writes its tokens' slots into the
   index buffer in place (uniform steps, mixed steps, CUDA-graph padding on slot 0). Every
   replay's router logits must equal each token's own slot's weights applied eagerly, and the
   stack and index buffer must keep their addresses (what captured graphs hold).
2. **cost**: per batch size, the layer with a plain router (what ``ROMA_ROUTER_SLOTS=1`` runs)
   against the layer with 4 slots resident and its tokens spread over them, each a captured
   graph replayed ``--reps`` times per round, rounds interleaved in rotating order; medians
   over rounds. Every slot holds the base router's values, so both route every token to the
   same experts and the difference is the slot machinery alone. Goal (issue 15): <= 1.01.

    python benchmarks/cuda_slot_gate.py --out slot_gate.json       # a GPU: OLMoE-1B-7B's layer
    python benchmarks/cuda_slot_gate.py --device cpu --hidden 64 --experts 8 \\
        --intermediate 32 --top-k 2 --sizes 1 --sizes 5 --rounds 2  # the logic, eagerly

On the GPU machine (no install: the image's PyTorch, the repo on the path):
``mkdir -p /tmp/pp && ln -sfn $PWD/service /tmp/pp/roma_service && PYTHONPATH=/tmp/pp python3
benchmarks/cuda_slot_gate.py --out $OUT/cuda_slot_gate.json``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.table import Table
from torch import nn

from roma_service.engine.slot_gate import SlotGate, StepSlots
from roma_service.engine.swap import _InPlaceSwap, commit_all

app = typer.Typer(add_completion=False)
SLOTS = 4
# Largest |logit difference| / largest |logit| a replay may show against the eager reference:
# the stacked GEMM and one slot's GEMM may split their sums differently; a stale weight or index
# shows up as an error of order 1.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
SIZES = [1, 8, 32, 128, 512]
# Expert groups padded to this many rows (grouped GEMM kernels want aligned groups).
ALIGN = 16


class MoELayer(nn.Module):
    """Router, softmax, top-k without renormalising (as OLMoE's ``norm_topk_prob: false``), SwiGLU
    experts as two grouped GEMMs over the tokens sorted by expert. Every shape is fixed by the
    number of tokens, so the whole layer can be captured in a CUDA graph."""

    def __init__(
        self,
        router: nn.Linear,
        w13: torch.Tensor,
        w2: torch.Tensor,
        top_k: int,
    ) -> None:
        super().__init__()
        self.router = router
        self.w13, self.w2, self.top_k = w13, w2, top_k
        self.experts = int(w13.shape[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.router(x)
        weights, chosen = logits.float().softmax(-1).topk(self.top_k, dim=-1)
        flat = chosen.flatten()
        order = flat.argsort(stable=True)
        expert_of, token_of = flat[order], order // self.top_k
        counts = torch.zeros(self.experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        padded = (counts + ALIGN - 1) // ALIGN * ALIGN
        ends, padded_ends = counts.cumsum(0), padded.cumsum(0)
        # Row of each sorted (token, expert) pair in the padded layout.
        rows = torch.arange(flat.numel(), device=x.device)
        dest = rows - (ends - counts)[expert_of] + (padded_ends - padded)[expert_of]
        grouped = x.new_zeros((flat.numel() + self.experts * (ALIGN - 1), x.shape[1]))
        grouped.index_copy_(0, dest, x.index_select(0, token_of))
        offs = padded_ends.to(torch.int32)
        gate, up = torch._grouped_mm(grouped, self.w13, offs=offs).chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, self.w2, offs=offs).index_select(0, dest)
        y = y * weights.flatten()[order].unsqueeze(-1).to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, y), logits


def _layer(
    hidden: int,
    experts: int,
    intermediate: int,
    top_k: int,
    device: torch.device,
    dtype: torch.dtype,
) -> MoELayer:
    generator = torch.Generator().manual_seed(0)

    def weights(*shape: int, fan_in: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) / fan_in**0.5).to(device, dtype)

    router = nn.Linear(hidden, experts, bias=False, device=device, dtype=dtype)
    router.weight.data.copy_(weights(experts, hidden, fan_in=hidden))
    w13 = weights(experts, hidden, 2 * intermediate, fan_in=hidden)
    return MoELayer(router, w13, weights(experts, intermediate, hidden, fan_in=intermediate), top_k)


class Replays:
    """``layer`` on the first ``n`` rows of one static input: a CUDA graph captured per size,
    or, on the CPU, an eager call (the same code path, without the graph)."""

    def __init__(
        self,
        layer: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        x: torch.Tensor,
        sizes: list[int],
        before: Callable[[int], None],
    ) -> None:
        self.layer, self.x = layer, x
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        if x.device.type != "cuda":
            return
        side = torch.cuda.Stream()
        for n in sizes:
            before(n)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    layer(x[:n])
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = layer(x[:n])
            self.graphs[n] = (graph, out)

    def __call__(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.graphs:
            return self.layer(self.x[:n])
        graph, out = self.graphs[n]
        graph.replay()
        return out


@dataclass
class CheckResult:
    steps: int
    events: dict[str, int]
    worst_error: float
    tolerance: float
    addresses_kept: bool
    graphs: bool

    @property
    def passed(self) -> bool:
        return self.worst_error <= self.tolerance and self.addresses_kept


def check(
    layer: MoELayer, sizes: list[int], steps: int, seed: int = 0
) -> tuple[CheckResult, SlotGate]:
    """Slot loads, frees and base swaps between replays of graphs captured once."""
    router, device = layer.router, layer.router.weight.device
    base = router.weight.detach().clone()
    step = StepSlots(SLOTS, max(sizes), device, "stacked")
    gate = SlotGate("router", router, step, "stacked", base)
    assert gate.stack is not None
    addresses = (gate.stack.data_ptr(), step.index.data_ptr())
    x = torch.zeros(max(sizes), router.in_features, device=device, dtype=base.dtype)
    replays = Replays(layer, x, sizes, lambda n: step.uniform(0, n))

    rng = np.random.default_rng(seed)
    scale = float(base.float().std())
    expected = {slot: base.clone() for slot in range(SLOTS)}
    events: Counter[str] = Counter()
    worst = 0.0
    for _ in range(steps):
        event = str(rng.choice(["load", "free", "swap base", "none"], p=[0.4, 0.15, 0.1, 0.35]))
        events[event] += 1
        slot = int(rng.integers(1, SLOTS))
        generator = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
        new = (torch.randn(base.shape, generator=generator) * scale).to(device, base.dtype)
        if event == "load":
            commit_all([gate.stage(slot, new)])
            expected[slot] = new
        elif event == "free":
            commit_all([gate.stage(slot, None)])
            expected[slot] = gate.base
        elif event == "swap base":
            commit_all([_InPlaceSwap.prepare(router, new)])
            expected[0] = new

        n = int(rng.choice(sizes))
        if rng.random() < 0.3:
            token_slots = np.full(n, int(rng.integers(SLOTS)), dtype=np.int64)
            step.uniform(int(token_slots[0]), n)
        else:
            real = int(rng.integers(1, n + 1))  # the rest is CUDA-graph padding: slot 0
            token_slots = np.zeros(n, dtype=np.int64)
            token_slots[:real] = rng.integers(0, SLOTS, real)
            step.mixed(token_slots[:real], n)
        x[:n].copy_(torch.randn(n, x.shape[1]).to(device, x.dtype))
        _, logits = replays(n)
        reference = torch.empty_like(logits)
        for s in np.unique(token_slots):
            rows = torch.from_numpy(np.flatnonzero(token_slots == s)).to(device)
            reference[rows] = F.linear(x[:n].index_select(0, rows), expected[int(s)])
        error = (logits.float() - reference.float()).abs().max() / reference.float().abs().max()
        worst = max(worst, float(error))
    kept = (gate.stack.data_ptr(), step.index.data_ptr()) == addresses
    result = CheckResult(
        steps, dict(events), worst, TOLERANCE[base.dtype], kept, bool(replays.graphs)
    )
    return result, gate


@dataclass
class CostRow:
    tokens: int
    plain_us: float
    slots_us: float
    ratio: float
    paired_ratio: float


def cost(layer: MoELayer, sizes: list[int], reps: int, rounds: int) -> list[CostRow]:
    """The layer with its plain router against the same layer with 4 stacked slots, every slot
    holding the base's values, tokens spread over the slots."""
    router, device = layer.router, layer.router.weight.device
    base = router.weight.detach().clone()
    plain_router = nn.Linear(router.in_features, router.out_features, bias=False)
    plain_router = plain_router.to(device, base.dtype)
    plain_router.weight.data.copy_(base)
    plain = MoELayer(plain_router, layer.w13, layer.w2, layer.top_k)
    step = StepSlots(SLOTS, max(sizes), device, "stacked")
    gate = SlotGate("router", router, step, "stacked", base)
    commit_all([gate.stage(slot, base.clone()) for slot in range(1, SLOTS)])

    def spread(n: int) -> None:
        step.mixed(np.arange(n, dtype=np.int64) % SLOTS, n)

    x = torch.randn(max(sizes), router.in_features).to(device, base.dtype)
    modes = {
        "plain": (Replays(plain, x, sizes, lambda n: None), lambda n: None),
        "slots": (Replays(layer, x, sizes, spread), spread),
    }
    rows = []
    for n in sizes:
        times: dict[str, list[float]] = {name: [] for name in modes}
        names = list(modes)
        for r in range(rounds):
            for name in names[r % 2 :] + names[: r % 2]:
                replays, before = modes[name]
                before(n)
                times[name].append(_time(partial(replays, n), reps, device))
        paired = [s / p for s, p in zip(times["slots"], times["plain"], strict=True)]
        plain_us, slots_us = statistics.median(times["plain"]), statistics.median(times["slots"])
        rows.append(CostRow(n, plain_us, slots_us, slots_us / plain_us, statistics.median(paired)))
    return rows


def _time(call: Callable[[], object], reps: int, device: torch.device) -> float:
    """Microseconds per call, over ``reps`` calls (CUDA events on a GPU). Its own, not
    ``engine_setup``'s: this file runs on the GPU machine with PyTorch alone."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / reps
    begin = time.perf_counter()
    for _ in range(reps):
        call()
    return (time.perf_counter() - begin) * 1e6 / reps


@app.command()
def main(
    device: Annotated[str, typer.Option(help="default: cuda when there is one")] = "",
    dtype: Annotated[
        str, typer.Option(help="bfloat16 (the grouped GEMM's fast path) or float32")
    ] = "bfloat16",
    hidden: int = 2048,
    experts: int = 64,
    intermediate: int = 1024,
    top_k: Annotated[int, typer.Option("--top-k")] = 8,
    sizes: Annotated[list[int], typer.Option(help="batch sizes captured (repeatable)")] = SIZES,
    steps: Annotated[int, typer.Option(help="check: replays with changes between them")] = 200,
    reps: Annotated[int, typer.Option(help="cost: replays per timing")] = 50,
    rounds: int = 20,
    out: Annotated[Path | None, typer.Option(help="also write the results as JSON")] = None,
) -> None:
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kind = getattr(torch, dtype)
    console = Console()
    with torch.inference_mode():
        result, _ = check(_layer(hidden, experts, intermediate, top_k, where, kind), sizes, steps)
        console.print(
            f"check on {where} ({'CUDA graphs' if result.graphs else 'eager'}), {result.steps} "
            f"replays, events {result.events}: worst relative logit error "
            f"{result.worst_error:.2e} (tolerance {result.tolerance:.0e}), addresses kept: "
            f"{result.addresses_kept} -> {'PASSED' if result.passed else 'FAILED'}"
        )
        rows = cost(_layer(hidden, experts, intermediate, top_k, where, kind), sizes, reps, rounds)
    name = torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu"
    table = Table(
        title=f"one MoE layer on {name} (hidden {hidden}, {experts} experts x {intermediate}, "
        f"top-{top_k}, {dtype}): plain router vs {SLOTS} stacked slots, mixed tokens; "
        f"medians of {rounds} rounds x {reps} replays"
    )
    for column in ("tokens", "plain us", "4 slots us", "ratio (goal <= 1.01)", "paired ratio"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row.tokens),
            f"{row.plain_us:.1f}",
            f"{row.slots_us:.1f}",
            f"{row.ratio:.4f}",
            f"{row.paired_ratio:.4f}",
        )
    console.print(table)
    if out is not None:
        report = {
            "device": name,
            "torch": torch.__version__,
            "check": asdict(result) | {"passed": result.passed},
            "cost": [asdict(row) for row in rows],
        }
        out.write_text(json.dumps(report, indent=2))
    if not result.passed:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
