"""Shared by the engine benchmarks: a model to serve, an engine running it, and router patches.

Not a benchmark itself. The model is a tiny OLMoE built from a config (``--hidden``/``--experts``
make a wider one, to see how apply time grows with router size) or any local checkpoint.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from roma_patch import BaseRouters, PatchMeta, read_checkpoint_routers, router_layer, write_patch
from roma_service.engine.process import EngineOptions, EngineProcess


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
    model: str | None, hidden: int, experts: int, layers: int, max_num_seqs: int = 16
) -> Iterator[tuple[EngineProcess, Path]]:
    """A healthy engine on ``model`` (or a tiny OLMoE built now); stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="roma-bench-") as tmp:
        model_dir = Path(model) if model else build_model(Path(tmp), hidden, experts, layers)
        options = EngineOptions(
            model=str(model_dir),
            log_path=Path(tmp) / "engine.log",
            max_model_len=512,
            extra_args=["--max-num-seqs", str(max_num_seqs)],
        )
        with EngineProcess(options) as engine:
            yield engine, model_dir


def patches(model_dir: Path, count: int, tuned_layers: int = 5) -> list[bytes]:
    """``count`` different patches of the last ``tuned_layers`` routers (the RoMA default)."""
    raw = read_checkpoint_routers(model_dir)
    names = sorted(raw, key=router_layer)[-tuned_layers:]
    base = BaseRouters.from_raw(str(model_dir), raw)
    out = []
    for seed in range(count):
        gen = torch.Generator().manual_seed(seed)
        tensors = {}
        for name in names:
            tensor = raw[name].to_torch()
            tensors[name] = tensor + torch.randn(tensor.shape, generator=gen).to(tensor.dtype)
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
