"""Shared by the gateway benchmarks: a whole stack (engines, Redis, ``roma-serve``) on loopback.

Not a benchmark itself. The gateway runs as its own process, as in production, so that the
load generator never shares an event loop (or a GIL) with it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from engine_setup import build_model

from roma_service.engine.process import EngineOptions, EngineProcess
from roma_service.registry import LocalRedis
from roma_service.registry.local import free_port

TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Stack:
    gateway: str
    engines: list[str]
    model_dir: Path
    served_model: str = ""
    gateway_pid: int = 0
    logs: list[Path] = field(default_factory=list)


@contextlib.contextmanager
def stack(
    engines: int = 1,
    model: str | None = None,
    swap_policy: str = "auto",
    max_num_seqs: int = 16,
    engine_core: int | None = None,
    gateway_core: int | None = None,
) -> Iterator[Stack]:
    """Engines on a tiny OLMoE (or ``model``), a local Redis, and a gateway in front.
    ``engine_core``: every engine process (API server, engine core, worker threads) pinned to
    that core; ``gateway_core``: the gateway process pinned to that one."""
    with tempfile.TemporaryDirectory(prefix="roma-gw-bench-") as tmp, contextlib.ExitStack() as es:
        root = Path(tmp)
        model_dir = Path(model) if model else build_model(root, 128, 8, 6)
        redis = es.enter_context(LocalRedis(root / "redis"))
        processes = []
        cores = sorted(os.sched_getaffinity(0))
        for i in range(engines):
            # Several engines: a core each. vLLM's own binding pins every engine's worker to the
            # same first core, where a second worker starves while the first polls (seen with 2
            # engines on 2 cores: a deploy's RPC timed out and the worker died).
            core = engine_core if engine_core is not None else cores[i % len(cores)]
            options = EngineOptions(
                model=str(model_dir),
                log_path=root / f"engine-{i}.log",
                max_model_len=512,
                extra_args=["--max-num-seqs", str(max_num_seqs)],
                cpu_cores=str(core) if engine_core is not None or engines > 1 else None,
            )
            processes.append(es.enter_context(_started(EngineProcess(options))))
        for process in processes:
            process.wait_healthy()
            if engine_core is not None and process.proc is not None:
                pin_tree(process.proc.pid, engine_core)
        port = free_port()
        env = dict(os.environ)
        env.update(
            ROMA_ADMIN_TOKEN=TOKEN,
            ROMA_SWAP_POLICY=swap_policy,
            ROMA_LOG_LEVEL="WARNING",
            ROMA_ENGINE_URLS=",".join(p.url for p in processes),
            ROMA_REDIS_URL=redis.url,
            ROMA_PORT=str(port),
            ROMA_CACHE_DIR=str(root / "cache"),
        )
        log = root / "gateway.log"
        gateway = subprocess.Popen(
            [sys.executable, "-m", "roma_service.cli"],
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        es.callback(_stop, gateway)
        if gateway_core is not None:
            pin_tree(gateway.pid, gateway_core)
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, gateway, log)
        served = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        yield Stack(url, [p.url for p in processes], model_dir, served, gateway.pid, [log])


def pin_tree(pid: int, core: int) -> None:
    """Pin a process and all its descendants (threads follow their process) to one core."""
    import psutil

    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.cpu_affinity([core])


@contextlib.contextmanager
def _started(process: EngineProcess) -> Iterator[EngineProcess]:
    process.start()
    try:
        yield process
    finally:
        process.stop()


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"gateway not ready in {timeout_s} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
