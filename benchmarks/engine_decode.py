"""Decode throughput of one engine with a router patch active vs the base routers (goal: ratio
>= 0.99, i.e. a patch costs nothing per token), and the cost of the opt-in expert-load counters.

All modes run on the SAME engine, interleaved round by round (the order rotates each round), so
machine noise hits every mode alike; the table reports medians over rounds, the ratio of medians
to base, and the median of same-round ratios (robust to drifting load).

    python benchmarks/engine_decode.py                      # tiny OLMoE, 5 rounds
    python benchmarks/engine_decode.py --rounds 9 --streams 16 --max-tokens 256
    python benchmarks/engine_decode.py --model /path/to/checkpoint

Each measurement: ``--streams`` concurrent completions of ``--max-tokens`` tokens each (EOS
ignored, greedy), tokens counted from the engine's usage, over the wall time of the batch.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from engine_setup import batch, patches, serving, throughput_table
from rich.console import Console

from roma_service.engine.client import EngineClient

app = typer.Typer(add_completion=False)


async def measure(
    url: str, model: str, patch: bytes, modes: list[str], rounds: int, streams: int, n: int
) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {mode: [] for mode in modes}
    async with EngineClient(url) as client:
        await batch(url, model, streams, n)  # warm-up
        for r in range(rounds):
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                if mode == "base":
                    await client.apply(None, 0)
                else:
                    await client.apply(patch, 1)
                await client.expert_load("enable" if mode.endswith("load") else "disable")
                await client.reset_prefix_cache()
                results[mode].append(await batch(url, model, streams, n))
        await client.expert_load("disable")
    return results


@app.command()
def main(
    model: Annotated[str | None, typer.Option(help="checkpoint dir (default: tiny OLMoE)")] = None,
    hidden: int = 128,
    experts: int = 8,
    layers: int = 6,
    rounds: int = 5,
    streams: int = 8,
    max_tokens: int = 128,
    expert_load: Annotated[bool, typer.Option(help="also measure the expert counters")] = True,
) -> None:
    modes = ["base", "patch"] + (["patch+expert-load"] if expert_load else [])
    with serving(model, hidden, experts, layers, max_num_seqs=max(streams, 1)) as (engine, md):
        patch = patches(md, 1)[0]
        results = asyncio.run(
            measure(engine.url, str(md), patch, modes, rounds, streams, max_tokens)
        )

    title = f"decode throughput, {streams} streams x {max_tokens} tokens, {rounds} rounds"
    Console(width=120).print(throughput_table(title, results, "base"))


if __name__ == "__main__":
    app()
