"""Swap under load: continuous requests while 20 patches deploy.

    python benchmarks/swap_under_load.py                          # 1 engine, slot mode
    python benchmarks/swap_under_load.py --engines 2              # two engines behind it
    python benchmarks/swap_under_load.py --policy drain           # the global swap
    python benchmarks/swap_under_load.py --policy immediate

``--workers`` clients send greedy completions back to back (token ids in and out). The deploys come
in ``--cycles`` bursts (each patch right after the previous one's 201), between windows without
deploys; throughput while deploying is compared with throughput without (interleaving makes drifts
in machine load hit both alike). Then every version seen is activated alone and each prompt asked
again with no load: that is what the version a response claims (``X-Router-Version``) must have
produced. A response whose tokens differ from its claimed version's, and that did not report a
change (``X-Router-Version-Changed``), is an *unreported version change*. Goals (issues 4 and 6): 0
failed requests, 0 unreported changes, throughput dip <= 5 %. In slot mode (``--policy auto``, the
default: the engines keep 4 versions resident) a deploy loads the new version beside the old one
and no response can span two, so "reported" stays 0 and every response must match its version
exactly. "Until every engine holds it" is the deploy's own latency: the gateway answers 201 only
once every engine verified the patch.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Annotated

import httpx
import typer
from engine_setup import patches, percentile
from gateway_stack import AUTH, stack
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False)
PROMPTS = [
    [281, 350, 324, 354, 339, 380, 349, 329, 85, 372, 268, 370, 91, 359, 16, 346, 360, 80],
    [1, 40, 71, 102, 133, 164, 195, 226],
    [300, 12, 77, 250, 9, 140, 333, 21, 64, 199],
    [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
]
Window = tuple[float, float]


@dataclass
class Outcome:
    start: float
    end: float
    prompt: int
    status: int
    version: str | None = None
    changed: str | None = None
    tokens: tuple[int, ...] = ()


@dataclass
class Run:
    outcomes: list[Outcome]
    deploy_ms: list[float]
    deploys: list[tuple[float, float, int]]  # (start, end, version)
    quiet: list[Window]
    busy: list[Window]


def body(model: str, prompt: int, tokens: int) -> dict:
    return {
        "model": model,
        "prompt": PROMPTS[prompt],
        "max_tokens": tokens,
        "min_tokens": tokens,
        "temperature": 0.0,
        "return_token_ids": True,
    }


async def worker(
    client: httpx.AsyncClient,
    model: str,
    tokens: int,
    index: int,
    stop: asyncio.Event,
    out: list[Outcome],
) -> None:
    turn = index
    while not stop.is_set():
        prompt = turn % len(PROMPTS)
        turn += 1
        start = time.monotonic()
        try:
            response = await client.post("/v1/completions", json=body(model, prompt, tokens))
        except httpx.HTTPError:
            out.append(Outcome(start, time.monotonic(), prompt, 0))
            continue
        outcome = Outcome(start, time.monotonic(), prompt, response.status_code)
        if response.status_code == 200:
            outcome.version = response.headers.get("X-Router-Version")
            outcome.changed = response.headers.get("X-Router-Version-Changed")
            outcome.tokens = tuple(response.json()["choices"][0]["token_ids"])
        out.append(outcome)


async def run(
    url: str,
    model: str,
    blobs: list[bytes],
    workers: int,
    tokens: int,
    quiet_s: float,
    cycles: int,
) -> Run:
    result = Run([], [], [], [], [])
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=workers * 2)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        tasks = [
            asyncio.create_task(worker(client, model, tokens, i, stop, result.outcomes))
            for i in range(workers)
        ]
        await asyncio.sleep(1.0)  # ramp-up, not measured
        for part in [*(blobs[i::cycles] for i in range(cycles)), []]:
            t = time.monotonic()
            await asyncio.sleep(quiet_s)
            result.quiet.append((t, time.monotonic()))
            if not part:
                break
            t = time.monotonic()
            for blob in part:
                began = time.monotonic()
                response = await client.post("/routers", headers=AUTH, content=blob)
                assert response.status_code == 201, response.text
                ended = time.monotonic()
                result.deploy_ms.append((ended - began) * 1e3)
                result.deploys.append((began, ended, response.json()["version"]))
            result.busy.append((t, time.monotonic()))
        stop.set()
        await asyncio.gather(*tasks)
    return result


async def references(
    url: str, model: str, versions: set[int], tokens: int
) -> dict[tuple[int, int], tuple[int, ...]]:
    """What each version produces for each prompt, asked alone with no load."""
    out = {}
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for version in sorted(versions):
            response = await client.post(f"/routers/{version}/activate", headers=AUTH)
            assert response.status_code == 200, response.text
            for prompt in range(len(PROMPTS)):
                r = await client.post("/v1/completions", json=body(model, prompt, tokens))
                assert r.headers["X-Router-Version"] == str(version)
                out[(version, prompt)] = tuple(r.json()["choices"][0]["token_ids"])
    return out


@app.command()
def main(
    engines: Annotated[int, typer.Option(help="engines behind the gateway")] = 1,
    policy: Annotated[
        str, typer.Option(help="auto (slot mode: engines keep versions resident), drain, immediate")
    ] = "auto",
    deploys: Annotated[int, typer.Option(help="patches deployed under load")] = 20,
    workers: Annotated[int, typer.Option(help="concurrent clients")] = 8,
    tokens: Annotated[int, typer.Option(help="tokens per completion")] = 16,
    quiet_s: Annotated[float, typer.Option(help="seconds of each window without deploys")] = 3.0,
    cycles: Annotated[int, typer.Option(help="quiet/deploy alternations")] = 4,
    model: Annotated[str | None, typer.Option(help="checkpoint dir (default: tiny OLMoE)")] = None,
) -> None:
    with stack(engines=engines, model=model, swap_policy=policy) as s:
        blobs = patches(s.model_dir, deploys)
        r = asyncio.run(run(s.gateway, s.served_model, blobs, workers, tokens, quiet_s, cycles))
        seen = {int(o.version) for o in r.outcomes if o.version is not None}
        refs = asyncio.run(references(s.gateway, s.served_model, seen, tokens))

    measured = [o for o in r.outcomes if o.start >= r.quiet[0][0]]
    failed = [o for o in measured if o.status != 200]
    ok = [o for o in measured if o.status == 200]
    reported = [o for o in ok if o.changed]
    wrong = [o for o in ok if not o.changed and o.tokens != refs[(int(o.version), o.prompt)]]
    # The check has teeth only if versions answer differently: count those that do.
    differ = sum(
        any(refs[(v, p)] != refs[(0, p)] for p in range(len(PROMPTS))) for v in seen if v != 0
    )

    def tps(windows: list[Window]) -> float:
        done = sum(tokens for o in ok for a, b in windows if a <= o.end < b)
        return done / sum(b - a for a, b in windows)

    quiet_tps, busy_tps = tps(r.quiet), tps(r.busy)
    busy_s = sum(b - a for a, b in r.busy)
    table = Table(
        title=f"swap under load: {engines} engine(s), policy {policy}, {workers} clients x "
        f"{tokens} tokens, {deploys} deploys in {cycles} bursts"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("requests (after ramp-up)", f"{len(measured)}"),
        ("failed requests (goal 0)", f"{len(failed)}"),
        ("responses that reported a version change", f"{len(reported)}"),
        ("unreported version changes (goal 0)", f"{len(wrong)}"),
        ("versions whose outputs differ from version 0's", f"{differ} of {len(seen) - 1}"),
        ("throughput without deploys, tokens/s", f"{quiet_tps:.1f}"),
        (f"throughput while deploying ({busy_s:.1f} s in all), tokens/s", f"{busy_tps:.1f}"),
        ("throughput dip (goal <= 5 %)", f"{100 * (1 - busy_tps / quiet_tps):.1f} %"),
        ("deploy -> every engine verified, p50 ms", f"{percentile(r.deploy_ms, 50):.1f}"),
        ("deploy -> every engine verified, p95 ms", f"{percentile(r.deploy_ms, 95):.1f}"),
    ]
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    for o in wrong[:5]:
        start, end, version = min(r.deploys, key=lambda d: abs(d[0] - o.start))
        Console().print(
            f"unreported: claims {o.version}, prompt {o.prompt}, ran {o.start - start:+.3f} .. "
            f"{o.end - start:+.3f} s from the start of deploy {version} ({end - start:.3f} s)"
        )


if __name__ == "__main__":
    app()
