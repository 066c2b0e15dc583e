"""The gateway image's Python layer: deploy/requirements/gateway.txt plus the project installed
with --no-deps, no torch, no vLLM. Rebuilt here in a fresh virtualenv (no Docker needed)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import tomllib
import venv
from pathlib import Path

import httpx
import pytest

from roma_service.registry import LocalRedis
from tests.deploy.support import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REQUIREMENTS = ROOT / "deploy/requirements/gateway.txt"
# What the gateway container runs: the app and the console script behind its ENTRYPOINT.
GATEWAY_MODULES = ("roma_service.gateway.app", "roma_service.cli")
HEAVY = ("torch", "vllm", "transformers", "sentence_transformers")
# The service never imports the trainer (data flows one way: trainer -> patch -> service).
BLOCKED = (*HEAVY, "roma_trainer")


def _listed_packages() -> set[str]:
    return set(PYPROJECT["tool"]["setuptools"]["packages"])


def _package_folders() -> set[str]:
    """Every importable package in the tree, by its installed dotted name."""
    found = set()
    for name, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join((name, *relative.parts)))
    return found


def test_every_package_folder_is_listed_in_pyproject() -> None:
    """A wheel (and so every image, which runs `pip install .`) only carries the packages
    pyproject lists; an editable install finds the others, so only this test notices."""
    missing = _package_folders() - _listed_packages()
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_gateway_imports_without_torch_or_vllm() -> None:
    """Blocking the heavy modules makes any import of them (even indirect) fail here."""
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in BLOCKED)
    imports = "; ".join(f"import {m}" for m in GATEWAY_MODULES)
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; {block}; {imports}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_requirements_are_pinned() -> None:
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            assert "==" in line, f"{line}: pin an exact version (the image must be reproducible)"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_gateway_serves_from_its_own_requirements(tmp_path: Path, redis_server: LocalRedis) -> None:
    """pip-install exactly what the gateway image installs into an empty virtualenv, then run
    `roma-serve` from it the way the container does (engine and Redis given by URL): it serves
    /health, reports why it is not ready (no engine behind the URL), answers the control routes,
    and stops cleanly on SIGTERM. About a minute; needs PyPI."""
    env_dir = tmp_path / "gateway-env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(python), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600
        )

    installed = run("-m", "pip", "install", "--no-cache-dir", "-r", str(REQUIREMENTS))
    assert installed.returncode == 0, installed.stderr[-3000:]
    project = run("-m", "pip", "install", "--no-cache-dir", "--no-deps", str(ROOT))
    assert project.returncode == 0, project.stderr[-3000:]
    absent = run(
        "-c", f"import importlib.util as u; print([m for m in {HEAVY!r} if u.find_spec(m)])"
    )
    assert absent.stdout.strip() == "[]", absent.stdout
    # uvicorn falls back to the pure-Python loop and parser without a word when these are
    # missing; the gateway's measured overhead assumes the C ones.
    fast = run("-c", "import uvicorn.loops.uvloop, uvicorn.protocols.http.httptools_impl")
    assert fast.returncode == 0, fast.stderr[-2000:]

    port = _free_port()
    env = {
        "PATH": f"{env_dir / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "ROMA_HOST": "127.0.0.1",
        "ROMA_PORT": str(port),
        "ROMA_ENGINE_URLS": f"http://127.0.0.1:{_free_port()}",
        "ROMA_REDIS_URL": redis_server.url,
        "ROMA_REDIS_PREFIX": "gateway-image-test",
        "ROMA_ADMIN_TOKEN": "image-token",
    }
    log = (tmp_path / "roma-serve.log").open("wb")
    server = subprocess.Popen(
        [str(env_dir / "bin" / "roma-serve")], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "roma-serve.log").read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "no /health after 60 s"
            time.sleep(0.3)
        ready = httpx.get(f"{url}/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
        assert httpx.get(f"{url}/routers", timeout=10).status_code == 401
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            assert server.wait(timeout=30) == 0
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
            log.close()
