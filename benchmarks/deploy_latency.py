"""``POST /routers`` to verified-active: p50/p95, broken down by phase.

    python benchmarks/deploy_latency.py                  # tiny OLMoE, 1 engine, 30 deploys
    python benchmarks/deploy_latency.py --engines 2      # also: until every engine holds it

Each deploy is a new patch of the last 5 routers (the RoMA default), sent as a raw body with no
other traffic; the gateway answers 201 only once every engine has applied it and a fresh
read-back from each matches the patch. Phases come from the gateway's 201 body; "client" is
the wall time the client saw. Goals (issue 4): p50 <= 50 ms on the tiny model, engine apply
(inside the workers) <= 5 ms. Then ``--rollbacks`` activations of stored versions (no upload).
"""

from __future__ import annotations

import time
from typing import Annotated

import httpx
import typer
from engine_setup import patches, percentile
from gateway_stack import AUTH, stack
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False)
PHASES = ("upload", "validate", "store", "lock", "drain", "apply", "engine_apply", "verify",
          "activate", "total")  # fmt: skip


@app.command()
def main(
    deploys: Annotated[int, typer.Option(help="patches to deploy")] = 30,
    rollbacks: Annotated[int, typer.Option(help="activations of stored versions")] = 10,
    engines: Annotated[int, typer.Option(help="engines behind the gateway")] = 1,
    model: Annotated[str | None, typer.Option(help="checkpoint dir (default: tiny OLMoE)")] = None,
) -> None:
    rows: list[dict[str, float]] = []
    activations: list[dict[str, float]] = []
    with stack(engines=engines, model=model) as s, httpx.Client(base_url=s.gateway) as client:
        blobs = patches(s.model_dir, deploys + 1)
        client.post("/routers", headers=AUTH, content=blobs[-1]).raise_for_status()  # warm-up
        for blob in blobs[:deploys]:
            start = time.perf_counter()
            response = client.post("/routers", headers=AUTH, content=blob)
            wall = (time.perf_counter() - start) * 1e3
            assert response.status_code == 201, response.text
            rows.append({**response.json()["timings_ms"], "client": wall})
        for i in range(rollbacks):
            start = time.perf_counter()
            response = client.post(f"/routers/{1 + i % deploys}/activate", headers=AUTH)
            wall = (time.perf_counter() - start) * 1e3
            assert response.status_code == 200 and response.json()["changed"], response.text
            activations.append({**response.json()["timings_ms"], "client": wall})
        size_kib = len(blobs[0]) / 1024

    table = Table(
        title=f"POST /routers -> verified active, {deploys} deploys, {engines} engine(s), "
        f"patch {size_kib:.0f} KiB (ms)"
    )
    for column in ("phase", "p50", "p95", "max"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for phase in (*PHASES, "client"):
        values = [r.get(phase, 0.0) for r in rows]
        table.add_row(
            phase,
            f"{percentile(values, 50):.2f}",
            f"{percentile(values, 95):.2f}",
            f"{max(values):.2f}",
        )
    Console().print(table)
    if activations:
        values = [a["client"] for a in activations]
        Console().print(
            f"POST /routers/N/activate (roll back/forward, no upload): p50 "
            f"{percentile(values, 50):.2f} ms, p95 {percentile(values, 95):.2f} ms "
            f"over {len(values)}"
        )


if __name__ == "__main__":
    app()
