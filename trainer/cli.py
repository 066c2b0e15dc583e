"""``roma-train``: train a router patch, evaluate a model (with or without a patch), push a patch.

Exit codes: 0 success; 2 bad input (data, config, model, patch), with a message naming the file
and line or the field; 1 the upload to the gateway failed (the patch file is kept).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console

from roma_patch import PatchError
from roma_trainer import flags
from roma_trainer.config import ConfigError, load_config
from roma_trainer.data import DataError, load_samples
from roma_trainer.modeling import ModelError
from roma_trainer.push import PushError, push_patch
from roma_trainer.routers import RouterError

app = typer.Typer(
    name="roma-train",
    help=(
        "RoMA router-only fine-tuning for Mixture-of-Experts LLMs.\n\n"
        "Tunes only the router linear of the chosen MoE layers with "
        "L(i) = CE(i) + lambda * sum_j W_ij ||r_i - r_j||^2, where r is the routing weights and "
        "j runs over the neighbours of sample i among the samples the base model already "
        "answers correctly, and writes a router patch (one safetensors file) that the gateway "
        "hot-swaps with POST /routers.\n\n"
        "Quick start: roma-train train --data trainer/data/sample.jsonl --out patch.safetensors"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
console = Console()

BAD_INPUT = (DataError, ConfigError, ModelError, RouterError, PatchError)


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each step.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


@app.command()
@flags.with_config_flags
def train(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="YAML or TOML recipe config; flags override it (default: the shipped "
            "configs/roma_default.yaml).",
        ),
    ] = None,
    push: Annotated[
        str | None,
        typer.Option(
            help="After training, POST the patch to this gateway URL (token from ROMA_ADMIN_TOKEN)."
        ),
    ] = None,
    **fields: Any,
) -> None:
    """Train the routers and write a router patch. Every key of the config file is a flag."""
    from roma_trainer.recipe import run

    try:
        cfg = load_config(config, flags.overrides(fields))
        if cfg.data is None:
            fail("no training data: pass --data FILE.jsonl (or set data: in the config file)")
        path = run(cfg)
    except BAD_INPUT as exc:
        fail(str(exc))
    from roma_patch import read_patch

    patch = read_patch(path)
    metrics = patch.meta.metrics
    console.print(
        f"patch [bold]{path}[/] id {patch.id} layers {patch.layers}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"train acc {metrics['train_acc_before']:.3f} -> {metrics['train_acc_after']:.3f}, "
        f"CE {metrics['train_ce_before']:.4f} -> {metrics['train_ce_after']:.4f}",
        highlight=False,
    )
    if push:
        try:
            answer = push_patch(path, push)
        except PushError as exc:
            fail(f"{exc} (the patch is saved at {path})", code=1)
        console.print(f"pushed to {push}: {json.dumps(answer)}", highlight=False, soft_wrap=True)


@app.command("eval")
def eval_cmd(
    data: Annotated[
        str,
        typer.Option(
            help="JSONL file of multiple-choice samples, hf:NAME, or olmes:TASK:SPLIT "
            "(e.g. olmes:piqa:validation)."
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            help="Base model: HF id or local path (default: smollm2-moe, built on first use)."
        ),
    ] = None,
    patch: Annotated[
        Path | None, typer.Option(help="Router patch to apply before scoring.")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the report here.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Requests per forward pass.")] = 32,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Run the checkpoint's own modelling code (DeepSeekMoE 16B).")
    ] = False,
    hidden_cache: Annotated[
        str,
        typer.Option(
            help="off | disk: with --patch, keep the hidden states entering the first patched "
            "layer in $ROMA_CACHE_DIR/hidden-states, so evaluating another patch of the same "
            "layers on the same model and data runs only those layers."
        ),
    ] = "off",
    gateway: Annotated[
        str | None,
        typer.Option(
            help="Score through this served model's completions API (a roma-serve gateway or a "
            "vLLM engine) instead of a local copy: measures what is served, with whatever router "
            "version is active there. --model then only names the tokenizer; --patch is refused."
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="ROMA_API_KEY",
            help="With --gateway: the bearer key of a gateway that requires one (ROMA_API_KEYS).",
        ),
    ] = None,
    router_version: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="With --gateway: score under this router version (X-Router-Version; a version "
            "the gateway keeps resident, e.g. a canary before promoting it), not the active one.",
        ),
    ] = None,
) -> None:
    """Accuracy per task and averaged over tasks (raw and length-normalised log-likelihood)."""
    if gateway:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if router_version is not None:
            headers["X-Router-Version"] = str(router_version)
        _eval_remote(data, model, gateway, json_out, batch_size, patch, headers)
        return
    if router_version is not None:
        fail("--router-version applies with --gateway; offline, pass the version's --patch")
    from roma_trainer.apply import apply_patch
    from roma_trainer.evaluate import HFBackend, evaluate, render, write_json
    from roma_trainer.hidden_cache import open_hidden_cache
    from roma_trainer.modeling import load_model

    if hidden_cache not in ("off", "disk"):
        fail(f"--hidden-cache {hidden_cache!r}: use off or disk")
    try:
        samples = load_samples(data)
        loaded = load_model(model, dtype="auto", trust_remote_code=trust_remote_code)
        applied = apply_patch(loaded.model, patch, loaded.model_id) if patch else None
    except BAD_INPUT as exc:
        fail(f"{patch}: {exc}" if isinstance(exc, PatchError) else str(exc))
    cache = None
    if applied and hidden_cache == "disk":  # every layer below the first patched one is base
        cache = open_hidden_cache(
            "disk", loaded.model, min(applied.layers), loaded.tokenizer, samples
        )
    report = evaluate(HFBackend(loaded.model, loaded.tokenizer, batch_size, cache), samples)
    if cache is not None:
        cache.save()
    report.extra = {
        "model": loaded.model_id,
        "data": data,
        "patch": applied.id if applied else None,
    }
    title = f"{Path(loaded.model_id).name}" + (f" + patch {applied.id[:12]}" if applied else "")
    render(report, title=title, console=console)
    if json_out:
        write_json(report, json_out)


def _eval_remote(
    data: str,
    model: str | None,
    url: str,
    json_out: Path | None,
    batch_size: int,
    patch: Path | None,
    headers: dict[str, str],
) -> None:
    from transformers import AutoTokenizer

    from roma_trainer.evaluate import evaluate, render, write_json
    from roma_trainer.evaluate_remote import CompletionsBackend, RemoteScoringError
    from roma_trainer.modeling import resolve_model

    if patch is not None:
        fail("--patch applies to a local model; deploy it to the gateway (POST /routers) instead")
    try:
        samples = load_samples(data)
        model_id = resolve_model(model)
        backend = CompletionsBackend(
            url, AutoTokenizer.from_pretrained(model_id), batch_size=batch_size, headers=headers
        )
        report = evaluate(backend, samples)
    except BAD_INPUT as exc:
        fail(str(exc))
    except (httpx.HTTPError, RemoteScoringError) as exc:
        fail(f"scoring through {url} failed: {exc}", code=1)
    report.extra = {
        "model": model_id,
        "data": data,
        "gateway": url,
        "router_versions": sorted(backend.router_versions),
    }
    versions = ",".join(sorted(backend.router_versions)) or "?"
    render(report, title=f"{url} (router version {versions})", console=console)
    if json_out:
        write_json(report, json_out)
