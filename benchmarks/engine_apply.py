"""How long applying a router patch takes: inside the worker (goal <= 5 ms on the tiny model) and
as the client's round trip through ``/collective_rpc``, p50/p95.

    python benchmarks/engine_apply.py                        # tiny OLMoE (hidden 128, 8 experts)
    python benchmarks/engine_apply.py --hidden 2048 --experts 64 --layers 6   # OLMoE-1B-7B-sized
                                                                              # routers

Alternates between two patches (and the base routers every tenth time), so every apply really
changes the last 5 layers. Columns, all in ms:
* apply: stage (convert + re-pack) and commit of every changed layer, inside the worker;
* verify: the functional read-back (probe batch through every live router);
* worker: everything inside the worker (base64 decode, parse, validate, apply, verify);
* round trip: what the client waited for (JSON + HTTP + vLLM's RPC to the worker and back).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from engine_setup import patches, percentile, serving
from rich.console import Console
from rich.table import Table

from roma_service.engine.client import ApplyResult, EngineClient

app = typer.Typer(add_completion=False)


async def measure(url: str, blobs: list[bytes], count: int) -> list[ApplyResult]:
    results: list[ApplyResult] = []
    async with EngineClient(url) as client:
        await client.apply(blobs[1], 1)  # warm-up (first use builds the worker's tables)
        for i in range(count):
            blob = None if i % 10 == 9 else blobs[i % 2]
            result = await client.apply(blob, i + 2)
            assert result.verified, result
            results.append(result)
        await client.apply(None, 0)
    return results


@app.command()
def main(
    model: Annotated[str | None, typer.Option(help="checkpoint dir (default: tiny OLMoE)")] = None,
    hidden: int = 128,
    experts: int = 8,
    layers: int = 6,
    count: int = 100,
) -> None:
    with serving(model, hidden, experts, layers) as (engine, model_dir):
        blobs = patches(model_dir, 2)
        results = asyncio.run(measure(engine.url, blobs, count))

    columns = {
        "apply (stage+commit)": [r.apply_ms for r in results],
        "verify (read-back)": [r.verify_ms for r in results],
        "worker total": [r.worker_total_ms for r in results],
        "round trip": [r.rpc_ms for r in results],
    }
    size_kib = len(blobs[0]) / 1024
    table = Table(
        title=f"apply latency, {count} applies, patch {size_kib:.0f} KiB "
        f"({max(len(r.changed) for r in results)} layers, hidden {hidden}, {experts} experts)"
    )
    for name in ("ms", "p50", "p95", "max"):
        table.add_column(name, justify="right" if name != "ms" else "left")
    for name, values in columns.items():
        table.add_row(
            name,
            f"{percentile(values, 50):.2f}",
            f"{percentile(values, 95):.2f}",
            f"{max(values):.2f}",
        )
    Console().print(table)


if __name__ == "__main__":
    app()
