"""Shared by the engine benchmarks: a model to serve, an engine running it, and router patches.

Not a benchmark itself. The model is a tiny OLMoE built from a config (``--hidden``/``--experts``
make a wider one, to see how apply time grows with router size) or any local checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np
import torch
from rich.table import Table

from roma_patch import BaseRouters, PatchMeta, read_checkpoint_routers, router_layer, write_patch
from roma_service.engine.binding import bind_request
from roma_service.engine.process import EngineOptions, EngineProcess

PROMPT = "Mixture of experts routes each token to a few experts with a tiny linear router."


def build_model(root: Path, hidden: int, experts: int, layers: int) -> Path:
    from roma_models.tiny import build_tiny_model

    heads = max(2, hidden // 64)  # head_dim 64: what vLLM's CPU attention accepts
    return build_tiny_model(
        "olmoe",
        root / f"olmoe-h{hidden}-e{experts}-l{layers}",
        hidden_size=hidden,
        num_experts=experts,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )


@contextlib.contextmanager
def serving(
    model: str | None,
    hidden: int,
    experts: int,
    layers: int,
    max_num_seqs: int = 16,
    router_slots: int | None = None,
) -> Iterator[tuple[EngineProcess, Path]]:
    """A healthy engine on ``model`` (or a tiny OLMoE built now); stopped on exit.
    ``router_slots``: ROMA_ROUTER_SLOTS of the engine (default: the environment's, else 4)."""
    with tempfile.TemporaryDirectory(prefix="roma-bench-") as tmp:
        model_dir = Path(model) if model else build_model(Path(tmp), hidden, experts, layers)
        options = EngineOptions(
            model=str(model_dir),
            log_path=Path(tmp) / "engine.log",
            max_model_len=512,
            extra_args=["--max-num-seqs", str(max_num_seqs)],
            router_slots=router_slots,
        )
        with EngineProcess(options) as engine:
            yield engine, model_dir


async def batch(
    url: str,
    model: str,
    streams: int,
    max_tokens: int,
    versions: Sequence[int] = (),
    distinct: bool = False,
) -> float:
    """Generated tokens per second for ``streams`` concurrent greedy completions. ``versions``:
    stream i runs under ``versions[i % len(versions)]`` (bound as the gateway binds requests);
    empty: no version (slot 0). ``distinct``: every stream gets its own prompt (identical greedy
    streams route every token to the same experts, which makes the MoE layers cheaper than
    real traffic)."""
    bodies = []
    for i in range(streams):
        body = {
            "model": model,
            "prompt": f"Stream {i}. {PROMPT}" if distinct else PROMPT,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        bodies.append(bind_request(body, versions[i % len(versions)]) if versions else body)
    async with httpx.AsyncClient(base_url=url, timeout=600.0) as http:
        started = time.perf_counter()
        responses = await asyncio.gather(*(http.post("/v1/completions", json=b) for b in bodies))
        elapsed = time.perf_counter() - started
    tokens = 0
    for response in responses:
        response.raise_for_status()
        tokens += response.json()["usage"]["completion_tokens"]
    return tokens / elapsed


def patches(model_dir: Path, count: int, tuned_layers: int = 5, scale: float = 1.0) -> list[bytes]:
    """``count`` patches of the last ``tuned_layers`` routers (the RoMA default): the base
    routers plus ``scale`` times Gaussian noise. ``scale`` 0: the base routers times 2, in every
    patch. Doubling is exact in any float format and keeps every token's expert order, so each
    token goes to the experts the base sends it to (only the softmax is sharper), yet the
    patches differ from the base, so each fills a slot of its own and runs the slot machinery
    (a patch equal to the base leaves its layers to slot 0's kernel)."""
    raw = read_checkpoint_routers(model_dir)
    names = sorted(raw, key=router_layer)[-tuned_layers:]
    base = BaseRouters.from_raw(str(model_dir), raw)
    out = []
    for seed in range(count):
        gen = torch.Generator().manual_seed(seed)
        tensors = {}
        for name in names:
            tensor = raw[name].to_torch()
            if scale == 0:
                tensors[name] = tensor * 2
                continue
            noise = torch.randn(tensor.shape, generator=gen).to(tensor.dtype)
            tensors[name] = tensor + scale * noise
        meta = PatchMeta(
            base_model=str(model_dir),
            base_fingerprint=base.fingerprint(names),
            layers=[router_layer(n) for n in names],
            objective="benchmark",
        )
        out.append(write_patch(tensors, meta))
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def throughput_table(title: str, results: dict[str, list[float]], reference: str) -> Table:
    """Median, min, max tokens/s per mode; ratio of medians to ``reference``; median of the
    same-round ratios (pairs cancel slow drifts in machine load), with a bootstrap 95 %
    interval over rounds (what this machine's noise leaves of a 1 % difference)."""
    table = Table(title=title)
    columns = ("mode", "median tok/s", "min", "max", f"ratio to {reference}", "paired ratio",
               "paired, 95 % interval")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right" if column != "mode" else "left")
    base = median(results[reference])
    for mode, values in results.items():
        paired = [v / b for v, b in zip(values, results[reference], strict=True)]
        low, high = bootstrap_median(paired)
        table.add_row(
            mode,
            f"{median(values):.1f}",
            f"{min(values):.1f}",
            f"{max(values):.1f}",
            f"{median(values) / base:.3f}",
            f"{median(paired):.3f}",
            f"{low:.3f}-{high:.3f}",
        )
    return table


def time_us(call: Callable[[torch.Tensor], object], x: torch.Tensor, repeat: int) -> float:
    """Microseconds per call of ``call(x)``, over ``repeat`` calls."""
    start = time.perf_counter()
    for _ in range(repeat):
        call(x)
    return (time.perf_counter() - start) / repeat * 1e6


def bootstrap_median(values: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the median of ``values`` (resampled with
    replacement, seeded)."""
    rng = np.random.default_rng(seed)
    data = np.asarray(values)
    medians = np.median(rng.choice(data, size=(draws, len(data)), replace=True), axis=1)
    return float(np.quantile(medians, 0.025)), float(np.quantile(medians, 0.975))
