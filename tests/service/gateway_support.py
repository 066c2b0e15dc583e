"""Helpers shared by the gateway tests: real patch files made from a tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from roma_patch import BaseRouters, PatchMeta, read_checkpoint_routers, write_patch


def base_routers(model_dir: Path) -> BaseRouters:
    return BaseRouters.from_raw(str(model_dir), read_checkpoint_routers(model_dir))


def patched_routers(
    model_dir: Path, layers: tuple[int, ...] = (4, 5), seed: int = 1, scale: float = 2.0
) -> dict[str, torch.Tensor]:
    """Base routers of ``layers`` moved far enough that greedy outputs change."""
    raw = read_checkpoint_routers(model_dir)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        name = f"model.layers.{layer}.mlp.gate.weight"
        base = raw[name].to_torch()
        out[name] = base + scale * torch.randn(base.shape, generator=gen, dtype=base.dtype)
    return out


def make_patch(
    model_dir: Path,
    layers: tuple[int, ...] = (4, 5),
    seed: int = 1,
    scale: float = 2.0,
    tensors: dict[str, torch.Tensor] | None = None,
    fingerprint: str | None = None,
) -> bytes:
    """A valid patch (unless ``tensors``/``fingerprint`` say otherwise) as bytes."""
    tensors = tensors if tensors is not None else patched_routers(model_dir, layers, seed, scale)
    base = base_routers(model_dir)
    known = [n for n in tensors if n in base.specs]
    meta = PatchMeta(
        base_model=str(model_dir),
        base_fingerprint=fingerprint or base.fingerprint(known),
        layers=sorted(int(n.split(".")[2]) for n in tensors),
        objective="test",
        hparams={"seed": seed},
    )
    return write_patch(tensors, meta)
