"""Decode throughput with 4 resident router versions and mixed traffic vs one version, on the
same engine (goal: ratio >= 0.99: slots cost nothing per token that matters).

    python benchmarks/engine_slots_decode.py                   # tiny OLMoE, 4 slots
    python benchmarks/engine_slots_decode.py --rounds 21 --streams 16 --max-tokens 256

One engine with ROMA_ROUTER_SLOTS=4 holding the base routers and 3 patches of the last layers.
Modes, interleaved round by round (order rotated each round):
* ``one version``: every stream on the same patched version (each step runs one slot: the
  gate calls that slot's kernel directly);
* ``4 versions, mixed``: stream i on version i % 4 (base, then the 3 patches): every decode step
  mixes the 4 slots in each patched layer's gate;
* ``no version``: requests without a version (slot 0), as before slots.

Each measurement: ``--streams`` concurrent completions of ``--max-tokens`` tokens (EOS ignored,
greedy), each stream with its own prompt (identical greedy streams would route every token to
the same experts in one-version mode only, and make that mode's MoE layers cheaper: measured
0.88 for mixed traffic with one shared prompt), tokens from the engine's usage over the wall
time of the batch.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from engine_setup import batch, patches, serving, throughput_table
from rich.console import Console

from roma_service.engine.client import EngineClient

app = typer.Typer(add_completion=False)
VERSIONS = (1, 2, 3)
MODES = {"one version": (1,), "4 versions, mixed": (0, *VERSIONS), "no version": ()}


async def measure(
    url: str, model: str, blobs: list[bytes], rounds: int, streams: int, n: int
) -> tuple[dict[str, list[float]], int]:
    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    async with EngineClient(url) as client:
        for version, blob in zip(VERSIONS, blobs, strict=True):
            await client.load_slot(blob, version, pin=True)
        await batch(url, model, streams, n, MODES["4 versions, mixed"], distinct=True)  # warm-up
        names = list(MODES)
        for r in range(rounds):
            for mode in names[r % len(names) :] + names[: r % len(names)]:
                results[mode].append(
                    await batch(url, model, streams, n, MODES[mode], distinct=True)
                )
        mixed_steps = (await client.slots()).mixed_steps
    return results, mixed_steps


@app.command()
def main(
    model: Annotated[str | None, typer.Option(help="checkpoint dir (default: tiny OLMoE)")] = None,
    hidden: int = 128,
    experts: int = 8,
    layers: int = 6,
    rounds: int = 9,
    streams: int = 8,
    max_tokens: int = 128,
    patch_scale: Annotated[
        float,
        typer.Option(
            help="noise added to the base routers in each patch (0: the base routers times 2, "
            "so every mode sends each token to the same experts and only the slot machinery "
            "differs)"
        ),
    ] = 1.0,
) -> None:
    with serving(model, hidden, experts, layers, max_num_seqs=max(streams, 1), router_slots=4) as (
        engine,
        md,
    ):
        blobs = patches(md, len(VERSIONS), scale=patch_scale)
        results, mixed_steps = asyncio.run(
            measure(engine.url, str(md), blobs, rounds, streams, max_tokens)
        )

    title = (
        f"decode throughput, 4 slots, {streams} streams x {max_tokens} tokens, {rounds} rounds "
        f"({mixed_steps} mixed-slot steps, patch scale {patch_scale:g})"
    )
    Console(width=120).print(throughput_table(title, results, "one version"))


if __name__ == "__main__":
    app()
