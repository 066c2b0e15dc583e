"""``roma-train bench pretrain`` and ``roma-train bench quality``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()
log = logging.getLogger("roma_trainer.bench")


def pretrain_cmd(
    out: Annotated[
        Path | None,
        typer.Option(help="Output directory (default: the bundled models/assets/bench-olmoe)."),
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps (batch 64).")] = 2500,
    seed: Annotated[int, typer.Option(help="Seed of the data stream and the init.")] = 0,
    check_vllm: Annotated[
        bool, typer.Option(help="Afterwards, load the checkpoint in vLLM and generate once.")
    ] = False,
) -> None:
    """Pretrain the benchmark's tiny OLMoE on the pretraining phrasings of every task domain."""
    from roma_trainer.bench.pretrain import PretrainConfig, pretrain
    from roma_trainer.bench.pretrain import check_vllm as vllm_check

    cfg = PretrainConfig(steps=steps, seed=seed)
    if out is not None:
        cfg.out = out
    path = pretrain(cfg)
    console.print(f"saved [bold]{path}[/]", highlight=False)
    if check_vllm:
        console.print(f"vLLM greedy output: {vllm_check(path)!r}", highlight=False)


def quality_cmd(
    small: Annotated[
        bool, typer.Option(help="The small version (a few minutes): tiny splits, two seeds.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Results directory (default: results, or results/small).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Base model (default: the embedded benchmark model).")
    ] = None,
    ablations: Annotated[bool, typer.Option(help="Run the ablations too.")] = True,
) -> None:
    """Base, CE, L1, L2, entropy, random neighbours, RoMA (k-NN, eps-ball) and the oracle on
    held-out phrasings; writes quality.md, quality.json and PNG plots into --out."""
    from roma_trainer.bench.quality import QualityConfig, run_quality

    if small:
        cfg = QualityConfig.small(out or Path("results/small"))
    else:
        cfg = QualityConfig(out=out or Path("results"))
    cfg.model = model
    cfg.ablations = ablations
    for noisy in ("httpx", "sentence_transformers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    results = run_quality(cfg)
    console.print((cfg.out / "quality.md").read_text(), highlight=False)
    console.print(f"total {results['seconds']:.0f} s; wrote {cfg.out}", highlight=False)
