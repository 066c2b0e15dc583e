"""The quick start's own behaviour, run for real up to the engine: where its state lives, the
admin token printed first (or the exported one), what it says when the service is not ready
in time, and that a second run on the same machine starts where the first one left the host
clean. The engine is a dead URL (the service can never be ready), so each run takes seconds;
the full run with training and a real engine is checked by hand (docs/service.md)."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
from pathlib import Path

import pytest

from roma_service.registry.local import free_port
from tests.deploy.support import ROOT
from tests.fixtures.engine import patch_bytes

SCRIPT = ROOT / "deploy/local/quickstart.sh"
DEAD_ENGINE = "http://127.0.0.1:9"  # discard port: connection refused


@pytest.fixture(scope="module")
def patch_file(tmp_path_factory: pytest.TempPathFactory, tiny_olmoe: Path) -> Path:
    path = tmp_path_factory.mktemp("patch") / "patch.safetensors"
    path.write_bytes(patch_bytes(tiny_olmoe, layers=(4, 5), scale=2.0))
    return path


def _quickstart(run_dir: Path, patch: Path, port: int, **env: str) -> tuple[int, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ROMA_", "QUICKSTART_"))}
    result = subprocess.run(
        ["bash", str(SCRIPT)],
        env={
            **base,
            "QUICKSTART_SETUP": "0",
            "QUICKSTART_DIR": str(run_dir),
            "QUICKSTART_PATCH": str(patch),
            "QUICKSTART_READY_TIMEOUT_S": "4",
            "ROMA_PORT": str(port),
            "ROMA_ENGINE_URLS": DEAD_ENGINE,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def test_a_timeout_says_why_and_a_second_run_starts_clean(tmp_path: Path, patch_file: Path) -> None:
    port = free_port()
    code, out = _quickstart(tmp_path, patch_file, port)
    assert code == 1, out
    token_line = next(line for line in out.splitlines() if "admin token for /routers:" in line)
    assert out.index(token_line) < out.index("== 2.")  # the token comes first
    assert f"state: {tmp_path}/state" in out and "cleared now" in out
    assert "not ready after 4 s" in out
    ready = out[out.index("-- GET /ready:") :]
    assert '"not_ready"' in ready and DEAD_ENGINE in ready  # /ready's reason, verbatim
    assert f"-- last lines of {tmp_path}/serve.log:" in out
    assert "state: router versions in" in out  # roma-serve's own lines, from its log

    code, again = _quickstart(tmp_path, patch_file, port)
    assert code == 1 and "not ready after 4 s" in again, again
    assert "in use" not in again and "already answers" not in again
    assert "reset: removed" in (tmp_path / "serve.log").read_text()
    assert token_line.split(":")[-1] not in again  # a fresh token for a fresh run


def test_exported_token_and_state_are_used_as_they_are(tmp_path: Path, patch_file: Path) -> None:
    state = tmp_path / "my-state"
    code, out = _quickstart(
        tmp_path, patch_file, free_port(), ROMA_ADMIN_TOKEN="my-token", ROMA_CACHE_DIR=str(state)
    )
    assert code == 1, out
    assert "admin token for /routers: my-token" in out
    assert f"state: {state} (reused as it is" in out
    assert "reset: removed" not in (tmp_path / "serve.log").read_text()
    assert (state / "redis").is_dir()


def test_a_port_already_taken_is_said_before_anything_starts(
    tmp_path: Path, patch_file: Path
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code, out = _quickstart(tmp_path, patch_file, server.server_address[1])
    finally:
        server.shutdown()
    assert code == 1 and "already answers" in out and "ROMA_PORT=" in out, out
    assert "== 2." not in out
