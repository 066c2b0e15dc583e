"""``roma-bench``: pretrain the benchmark model, run the quality benchmark (synthetic or real
tasks), screen a model.

The commands import their heavy dependencies lazily, so ``roma-bench --help`` stays fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from roma_trainer.cli import main as configure_logging

app = typer.Typer(
    name="roma-bench",
    help="Benchmarks that train and evaluate router patches and print a table.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()


# -v/--verbose and the log format of roma-train, which the benchmark drives.
app.callback()(configure_logging)


def quiet_libraries() -> None:
    """The benchmark logs every run; the libraries' per-request and per-load lines would drown
    them."""
    for noisy in ("httpx", "sentence_transformers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command("pretrain")
def pretrain_cmd(
    out: Annotated[
        Path | None,
        typer.Option(help="Output directory (default: the bundled models/assets/bench-olmoe)."),
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps (batch 64).")] = 2500,
    seed: Annotated[int, typer.Option(help="Seed of the data stream and the init.")] = 0,
    read_share: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of task sequences drawn from the 'read' phrasings, which the model "
            "learns to answer but its router is never taught to route (a variant; the bundled "
            "model uses 0).",
        ),
    ] = 0.0,
    check_vllm: Annotated[
        bool,
        typer.Option(
            help="Afterwards, load the checkpoint in vLLM and generate once (needs the cpu or "
            "gpu extra)."
        ),
    ] = False,
) -> None:
    """Pretrain the benchmark's tiny OLMoE on the pretraining phrasings of every task domain."""
    from roma_bench.synthetic.pretrain import PretrainConfig, pretrain
    from roma_bench.synthetic.pretrain import check_vllm as vllm_check

    cfg = PretrainConfig(steps=steps, seed=seed, read_share=read_share)
    if out is not None:
        cfg.out = out
    path = pretrain(cfg)
    console.print(f"saved [bold]{path}[/]", highlight=False)
    if check_vllm:
        console.print(f"vLLM greedy output: {vllm_check(path)!r}", highlight=False)


@app.command("quality")
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
    from roma_bench.protocol import QualityConfig
    from roma_bench.synthetic.quality import run_quality

    if small:
        cfg = QualityConfig.small(out or Path("results/small"))
    else:
        cfg = QualityConfig(out=out or Path("results"))
    cfg.model = model
    cfg.ablations = ablations
    quiet_libraries()
    results = run_quality(cfg)
    console.print((cfg.out / "quality.md").read_text(), highlight=False)
    console.print(f"total {results.seconds:.0f} s; wrote {cfg.out}", highlight=False)


@app.command("screen")
def screen_cmd(
    model: Annotated[
        str | None, typer.Option(help="Base model (default: the embedded benchmark model).")
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Directory for the splits, the run ledger and screen.md/json.")
    ] = Path("results/screen"),
    run: Annotated[
        list[str] | None,
        typer.Option(
            help="Also train this method with seed 0 and score it on validation: "
            "method[:lr[:lambda]], e.g. ce:0.01 or roma_knn:0.01:1. Repeatable."
        ),
    ] = None,
    small: Annotated[bool, typer.Option(help="Tiny splits and budgets (for tests).")] = False,
) -> None:
    """How much routing can do for a model, on the validation split only (a few minutes): base,
    domain routing, the best task-shared routing and the oracle, with the pool's base accuracy
    by phrasing group. Screens a benchmark-model variant without touching the test split."""
    from roma_bench.protocol import QualityConfig
    from roma_bench.synthetic.screen import RunSpec, screen

    try:
        specs = [RunSpec.parse(r) for r in run or []]
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--run") from err
    cfg = QualityConfig.small(out) if small else QualityConfig(out=out)
    cfg.model = model
    quiet_libraries()
    screen(cfg, specs)
    console.print((out / "screen.md").read_text(), highlight=False)


@app.command("real")
def real_cmd(
    model: Annotated[
        str | None,
        typer.Option(
            help="The MoE checkpoint directory (Qwen2-MoE or OLMoE), e.g. the output of "
            "`roma-models build smollm2-moe`."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Results directory (default: results/real, or results/real-small)."),
    ] = None,
    small: Annotated[
        bool, typer.Option(help="The small version (a couple of minutes on a tiny model).")
    ] = False,
    dense: Annotated[
        str | None,
        typer.Option(
            help="The dense model the MoE was made from (a reference): a checkpoint folder or "
            "a .gguf file, e.g. SmolLM2's: `python -c 'from roma_models.smollm2 import "
            "gguf_file; print(gguf_file())'`."
        ),
    ] = None,
    ablations: Annotated[bool, typer.Option(help="Run the ablations too.")] = True,
    only: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated methods (ce, l1, l2, entropy, random, roma_knn, roma_eps) "
            "and/or 'ablations' (RoMA k-NN's): run only their searches and seeds, and no "
            "report. A helper worker beside a full run on the same --out, on another core: "
            "the full run finds them in runs.jsonl."
        ),
    ] = None,
) -> None:
    """The protocol on real tasks (ARC-Easy, SciQ, PIQA, HellaSwag, SIQA, COPA from OLMES
    data), with the all-experts and dense references and two out-of-set tasks; writes real.md,
    real.json and real_accuracy.png into --out. Re-runs reuse every run in runs.jsonl, and so
    does a run beside helper workers (--only) sharing it."""
    from roma_bench.real.quality import RealConfig, run_methods, run_real

    if model is None:
        raise typer.BadParameter(
            "pass the MoE checkpoint directory (build it with `roma-models build smollm2-moe`)",
            param_hint="--model",
        )
    if small:
        cfg = RealConfig.small(out or Path("results/real-small"))
    else:
        cfg = RealConfig(out=out or Path("results/real"))
    cfg.model = model
    cfg.dense = dense
    cfg.ablations = ablations
    quiet_libraries()
    if only is not None:
        methods = tuple(m.strip() for m in only.split(",") if m.strip())
        try:
            searches = run_methods(cfg, methods)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--only") from exc
        for method, search in searches.items():
            console.print(f"{method}: best {search.best} (in {cfg.out / 'runs.jsonl'})")
        return
    results = run_real(cfg)
    console.print((cfg.out / "real.md").read_text(), highlight=False)
    console.print(f"total {results.seconds:.0f} s; wrote {cfg.out}", highlight=False)


@app.command("progress")
def progress_cmd(
    out: Annotated[
        Path, typer.Option(help="The benchmark's results directory (holds runs.jsonl).")
    ] = Path("results/real"),
) -> None:
    """Where a long benchmark stands, from its ledger alone (nothing is trained or scored):
    every method's grid points and finished seeds, and the paired test differences to CE-only
    so far. Run it beside `roma-bench real` at any time."""
    from roma_bench.progress import progress

    ledger = out / "runs.jsonl"
    if not ledger.exists():
        raise typer.BadParameter(
            f"{ledger} does not exist: nothing has run there", param_hint="--out"
        )
    text = progress(ledger, data=str(out / "data" / "train.jsonl"))
    console.print(text, highlight=False, soft_wrap=True)
