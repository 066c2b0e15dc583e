"""What the gateway costs: 16 concurrent streams straight to the engine vs through the gateway.

    python benchmarks/gateway_overhead.py                 # tiny OLMoE on the CPU
    python benchmarks/gateway_overhead.py --streams 16 --tokens 64 --rounds 4
    python benchmarks/gateway_overhead.py --model /work/cache/smollm2-moe   # a real 135M MoE
    python benchmarks/gateway_overhead.py --client httpx  # the load generator of earlier figures
    python benchmarks/gateway_overhead.py --nginx         # nginx as a fifth target
    python benchmarks/gateway_overhead.py --keep-alive    # pooled client connections

Four targets are measured side by side in one run, alternating (direct, direct bound, bare hop,
gateway, direct, ...) so that load from anything else on the machine hits them alike: the engine
itself; the engine sent bodies bound to a router version as the gateway binds them
(``vllm_xargs`` and ``cache_salt``: what the engine's side of a gateway request costs); the
engine behind ``bare_proxy.py`` (the cheapest Python hop: one more loopback connection and
event loop, nothing else) and the engine behind the gateway. The bare hop splits the gateway's
overhead into what any proxy in front of the engine costs and what the gateway adds; with
``--nginx`` (``apt-get install nginx-light``), nginx as a plain reverse proxy (one worker, on the
gateway's core, responses unbuffered) shows what a compiled hop costs on the same rig. Per
round: ``--streams`` concurrent streamed completions of ``--tokens`` tokens each (greedy, EOS
ignored), on fresh connections (``--keep-alive``: each target's client keeps its connections
across rounds; the servers close connections idle for 5 s, uvicorn's default, so this holds
while a round of all targets takes less: about 2 s on the tiny model, not on the 135M one).
Goals (issue 4): throughput ratio gateway/direct >= 0.97, p50 time-to-first-token ratio <= 1.05.
A second table gives each target's same-round ratios to direct: their median over rounds and
its 95 % bootstrap interval, which says what this machine's noise leaves of a 5 % difference.

The load generator reads the streams with aiohttp by default: with httpx it used more of the
client core than the gateway did (its per-event parsing), and in gateway rounds that core is
the gateway's too; a real client runs on another machine.

Fair by default on a 2-core machine: the engine (its API server, engine core and worker, with
``VLLM_CPU_OMP_THREADS_BIND``) is pinned to ``--engine-core`` and the gateway and this load
generator to ``--client-core``, for the direct run too, so the gateway competes with the load
generator and not with decoding. ``--no-pin`` puts everything on every core (what a gateway
costs on a machine whose cores the engine already saturates). The gateway runs in slot mode
(every completion is bound to a router version: its body is parsed and re-serialised).

The wall-clock ratios move with whatever else runs on the machine; the gateway's own CPU time
(user + system, from psutil) per request and per token does much less, so it is printed too:
measured over the gateway rounds, less what the idle gateway (its reconcile and expert-load
loops) burns over the same time, as measured during the direct rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterable, Iterator
from pathlib import Path
from typing import Annotated

import aiohttp
import httpx
import psutil
import typer
from engine_setup import bootstrap_median, median, percentile
from gateway_stack import pin_tree, stack
from rich.console import Console
from rich.table import Table

from roma_service.engine.binding import bind_request
from roma_service.registry.local import free_port

app = typer.Typer(add_completion=False)
PROMPTS = ["The quick brown fox", "Question: what is 12 + 7? Answer:", "Mixture of experts"]


def _body(model: str, prompt: str, tokens: int, version: int | None) -> dict[str, object]:
    """A streamed greedy completion; bound to router ``version`` as the gateway binds it."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "min_tokens": tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True}  # fmt: skip
    return body if version is None else bind_request(body, version)


async def _read_events(
    lines: AsyncIterable[str] | AsyncIterable[bytes], start: float
) -> tuple[float, int]:
    """(seconds from ``start`` to the first SSE data event, events received)."""
    ttft = None
    received = 0
    async for line in lines:
        if line.startswith("data: {" if isinstance(line, str) else b"data: {"):
            received += 1
            if ttft is None:
                ttft = time.perf_counter() - start
    return ttft or 0.0, received


async def one_stream(
    client: httpx.AsyncClient, model: str, prompt: str, tokens: int, version: int | None = None
) -> tuple[float, int]:
    """(seconds to the first token, tokens received) of one streamed completion (httpx)."""
    start = time.perf_counter()
    body = _body(model, prompt, tokens, version)
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        return await _read_events(response.aiter_lines(), start)


async def one_stream_aiohttp(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    prompt: str,
    tokens: int,
    version: int | None = None,
) -> tuple[float, int]:
    """The same with aiohttp, whose reading costs a fraction of httpx's CPU per event."""
    start = time.perf_counter()
    body = _body(model, prompt, tokens, version)
    async with session.post(f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        return await _read_events(response.content, start)


async def one_round(
    url: str,
    model: str,
    streams: int,
    tokens: int,
    client: str = "aiohttp",
    version: int | None = None,
    session: aiohttp.ClientSession | None = None,
) -> dict[str, float | list[float]]:
    """``streams`` concurrent streams: on fresh connections (the handshake is part of TTFT), or
    on ``session``'s pooled ones (aiohttp only)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(streams)]
    if client == "httpx":
        limits = httpx.Limits(max_connections=streams * 2)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
            start = time.perf_counter()
            results = await asyncio.gather(
                *(one_stream(http, model, p, tokens, version) for p in prompts)
            )
    else:
        async with contextlib.AsyncExitStack() as stack:
            if session is None:
                session = await stack.enter_async_context(_session())
            start = time.perf_counter()
            results = await asyncio.gather(
                *(one_stream_aiohttp(session, url, model, p, tokens, version) for p in prompts)
            )
    wall = time.perf_counter() - start
    return {"tps": sum(n for _, n in results) / wall, "ttft": [t for t, _ in results]}


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))


@contextlib.contextmanager
def bare_hop(upstream: str, core: int | None) -> Iterator[tuple[str, int]]:
    """``bare_proxy.py`` in front of ``upstream``, in a process of its own (on ``core``): its
    URL and process id."""
    port = free_port()
    script = Path(__file__).with_name("bare_proxy.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--upstream", upstream, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if core is not None:
            pin_tree(proc.pid, core)
        url = f"http://127.0.0.1:{port}"
        _wait_for(url, proc, "the bare proxy")
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream engine {{ server {upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_hop(upstream: str, core: int | None) -> Iterator[tuple[str, int]]:
    """nginx (one worker) as a plain reverse proxy in front of ``upstream``, on ``core``: the
    hop a compiled proxy costs, for comparison with the Python ones. Its URL and the worker's
    process id."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="roma-nginx-") as root:
        conf = Path(root) / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(root=root, port=port, upstream=upstream.removeprefix("http://"))
        )
        proc = subprocess.Popen(
            ["nginx", "-c", str(conf), "-p", root],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_for(url, proc, "nginx")
            if core is not None:
                pin_tree(proc.pid, core)
            worker = psutil.Process(proc.pid).children()[0].pid
            yield url, worker
        finally:
            proc.terminate()
            proc.wait(10)


def _paired_table(measured: dict[str, list[dict]]) -> Table:
    """Each target's same-round ratios to the direct round before it (pairs cancel slow drifts
    in machine load): their median and its 95 % bootstrap interval over rounds. A burst's TTFT
    moves in whole engine steps, so one round's p50 ratio swings by tens of percent and a
    single run's ratio of pooled p50s says less than the interval does."""
    direct = measured["direct"]
    table = Table(title=f"same-round ratios to direct: median over {len(direct)} rounds [95 %]")
    for column in ("target", "tokens/s", "TTFT p50"):
        table.add_column(column, justify="left" if column == "target" else "right")
    for name in [n for n in measured if n != "direct"]:
        tps = [r["tps"] / d["tps"] for r, d in zip(measured[name], direct, strict=True)]
        ttft = [
            percentile(r["ttft"], 50) / percentile(d["ttft"], 50)
            for r, d in zip(measured[name], direct, strict=True)
        ]
        table.add_row(name, *(_with_interval(ratios) for ratios in (tps, ttft)))
    return table


def _with_interval(ratios: list[float]) -> str:
    low, high = bootstrap_median(ratios)
    return f"{median(ratios):.3f} [{low:.3f}, {high:.3f}]"


def _wait_for(url: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{url}/v1/models", timeout=2).raise_for_status()
            return
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.2)


async def _measure(
    targets: dict[str, tuple[str, int | None]],
    proxies: dict[str, psutil.Process],
    model: str,
    streams: int,
    tokens: int,
    rounds: int,
    client: str,
    keep_alive: bool,
) -> tuple[dict[str, list[dict]], dict[tuple[str, str], float], dict[str, float], float]:
    """Every target's rounds, alternating: the rounds' results; each proxy's CPU seconds during
    each target's rounds; each target's wall seconds; this process's CPU (the load generator's).
    """
    async with contextlib.AsyncExitStack() as stack:
        # --keep-alive: a client per target whose connections outlive the rounds.
        sessions = {
            name: await stack.enter_async_context(_session()) if keep_alive else None
            for name in targets
        }
        for name, (url, version) in targets.items():  # warm-up every path (and every pool)
            await one_round(url, model, streams, 8, client, version, sessions[name])
        measured: dict[str, list[dict]] = {name: [] for name in targets}
        cpu_s = {(proxy, name): 0.0 for proxy in proxies for name in targets}
        wall_s = {name: 0.0 for name in targets}
        load_s = 0.0
        for _ in range(rounds):
            for name, (url, version) in targets.items():
                before = {proxy: proc.cpu_times() for proxy, proc in proxies.items()}
                start, mine = time.perf_counter(), time.process_time()
                measured[name].append(
                    await one_round(url, model, streams, tokens, client, version, sessions[name])
                )
                load_s += time.process_time() - mine
                wall_s[name] += time.perf_counter() - start
                for proxy, proc in proxies.items():
                    now = proc.cpu_times()
                    used = now.user + now.system - before[proxy].user - before[proxy].system
                    cpu_s[proxy, name] += used
    return measured, cpu_s, wall_s, load_s


@app.command()
def main(
    streams: Annotated[int, typer.Option(help="concurrent streams per round")] = 16,
    tokens: Annotated[int, typer.Option(help="tokens per stream")] = 64,
    rounds: Annotated[int, typer.Option(help="rounds per target (alternating)")] = 4,
    model: Annotated[str | None, typer.Option(help="checkpoint dir (default: tiny OLMoE)")] = None,
    engine_core: Annotated[int, typer.Option(help="core the engine is pinned to")] = 0,
    client_core: Annotated[int, typer.Option(help="core of the gateway and this client")] = 1,
    pin: Annotated[bool, typer.Option(help="pin as above (--no-pin: all cores for all)")] = True,
    client: Annotated[
        str, typer.Option(help="load generator's HTTP client: aiohttp (light) or httpx")
    ] = "aiohttp",
    nginx: Annotated[
        bool,
        typer.Option(help="also measure nginx as the hop (a compiled proxy; needs `nginx`)"),
    ] = False,
    keep_alive: Annotated[
        bool,
        typer.Option(
            help="reuse each target's client connections across rounds, as a pooled client "
            "(the OpenAI SDK's) does; default: fresh connections each round (aiohttp only)"
        ),
    ] = False,
) -> None:
    if client not in ("aiohttp", "httpx"):
        raise typer.BadParameter("aiohttp or httpx", param_hint="--client")
    if keep_alive and client != "aiohttp":
        raise typer.BadParameter("--keep-alive needs the aiohttp client", param_hint="--client")
    if nginx and shutil.which("nginx") is None:
        raise typer.BadParameter("nginx is not installed (apt-get install nginx-light)")
    cores = {"engine_core": engine_core, "gateway_core": client_core} if pin else {}
    if pin:
        os.sched_setaffinity(0, {client_core})
    hop_core = client_core if pin else None
    with (
        stack(engines=1, model=model, max_num_seqs=streams, **cores) as s,
        bare_hop(s.engines[0], hop_core) as (bare, bare_pid),
        nginx_hop(s.engines[0], hop_core) if nginx else contextlib.nullcontext((None, 0)) as (
            nginx_url,
            nginx_pid,
        ),
    ):
        # name -> (URL, router version the body is bound to: None sends it as the client does)
        targets = {
            "direct": (s.engines[0], None),
            "direct, bound": (s.engines[0], 0),
            "bare hop": (bare, None),
            "gateway": (s.gateway, None),
        }
        if nginx_url is not None:
            targets["nginx hop"] = (nginx_url, None)
        # Each proxy's CPU during each target's rounds: its own rounds less what it burns idle.
        proxies = {"gateway": psutil.Process(s.gateway_pid), "bare hop": psutil.Process(bare_pid)}
        if nginx_url is not None:
            proxies["nginx hop"] = psutil.Process(nginx_pid)
        measured, cpu_s, wall_s, load_s = asyncio.run(
            _measure(targets, proxies, s.served_model, streams, tokens, rounds, client, keep_alive)
        )

    def summary(name: str) -> tuple[float, float, float]:
        tps = statistics.median(r["tps"] for r in measured[name])
        ttft = [t for r in measured[name] for t in r["ttft"]]
        return tps, percentile(ttft, 50) * 1e3, percentile(ttft, 95) * 1e3

    direct = summary("direct")
    where = (
        f"engine on core {engine_core}, gateway + client on core {client_core}"
        if pin
        else ("no pinning")
    )
    connections = "pooled connections" if keep_alive else "fresh connections each round"
    table = Table(
        title=f"{streams} concurrent streams x {tokens} tokens, {rounds} rounds each ({where}; "
        f"{client} client, {connections})"
    )
    for column in ("target", "tokens/s (median round)", "TTFT p50 ms", "TTFT p95 ms"):
        table.add_column(column, justify="left" if column == "target" else "right")
    for name in targets:
        tps, p50, p95 = summary(name)
        table.add_row(name, f"{tps:.1f}", f"{p50:.1f}", f"{p95:.1f}")
    for name in [n for n in targets if n != "direct"]:
        tps, p50, p95 = summary(name)
        goals = (" (goal >= 0.97)", " (goal <= 1.05)") if name == "gateway" else ("", "")
        table.add_row(
            f"{name} / direct",
            f"{tps / direct[0]:.3f}{goals[0]}",
            f"{p50 / direct[1]:.3f}{goals[1]}",
            f"{p95 / direct[2]:.3f}",
        )
    Console().print(table)
    Console().print(_paired_table(measured))
    for proxy in proxies:
        others = [name for name in targets if name not in proxies]
        idle = sum(cpu_s[proxy, n] for n in others) / sum(wall_s[n] for n in others)
        busy_s = cpu_s[proxy, proxy] - idle * wall_s[proxy]
        per_stream = busy_s / (rounds * streams) * 1e3
        Console().print(
            f"{proxy} process CPU: {per_stream:.2f} ms per request of {tokens} streamed tokens "
            f"({per_stream / tokens * 1e3:.1f} us per token; less {idle * 1e3:.1f} ms/s idle)"
        )
    Console().print(
        "On a machine whose cores the engine already saturates, that CPU is taken from decoding."
    )
    per_load = load_s / (rounds * len(targets) * streams) * 1e3
    Console().print(
        f"load generator ({client}) CPU: {per_load:.2f} ms per request, on the gateway's core."
    )
    Console().print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")


if __name__ == "__main__":
    app()
