"""``roma-serve`` end to end as a user runs it: no ROMA_* settings but a model, a port and its
state folder, so it starts its own engine (with an engine option passed through) and Redis,
prints a generated admin token and where its state lives, serves under the folder's name,
deploys, and on SIGTERM stops everything it started."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from roma_service.registry.local import free_port
from tests.fixtures.engine import patch_bytes
from tests.service.gateway_support import ALL_LAYERS, PROMPT_IDS


def test_help_reads_like_docs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "roma_service.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for option in (
        "--model",
        "--served-model-name",
        "--engine-url",
        "--redis-url",
        "--port",
        "--swap-policy",
        "--reset-state",
    ):
        assert option in result.stdout
    assert "ROMA_ADMIN_TOKEN" in result.stdout


@pytest.mark.slow
def test_embedded_default_serves_deploys_and_stops_cleanly(
    tiny_olmoe: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROMA_")}
    env["ROMA_CACHE_DIR"] = str(tmp_path / "cache")  # the local Redis keeps its data here
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "roma_service.cli",
            "--model",
            str(tiny_olmoe),
            "--port",
            str(port),
            "--max-model-len",
            "384",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("roma-serve never became ready:\n" + (tmp_path / "serve.log").read_text())
        output = (tmp_path / "serve.log").read_text()
        token = re.search(r"admin token is:\s+(\S+)", output).group(1)
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "redis-server" in names and "vllm.entrypoints.openai.api_server" in names

        assert f"state: router versions in {tmp_path / 'cache' / 'redis'}" in output
        served = httpx.get(f"{base}/v1/models").json()["data"][0]
        model = served["id"]
        assert model == tiny_olmoe.name  # the folder's name, not its absolute path
        assert served["max_model_len"] == 384  # an engine option passed through
        engine_log = tmp_path / "cache" / "logs" / f"engine-{port}.log"
        assert "vllm" in engine_log.read_text().lower()
        body = {"model": model, "prompt": PROMPT_IDS, "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"{base}/v1/completions", json=body).headers["X-Router-Version"] == "0"
        deployed = httpx.post(
            f"{base}/routers",
            headers={"Authorization": f"Bearer {token}"},
            files={"patch": patch_bytes(tiny_olmoe, layers=ALL_LAYERS, scale=2.0, seed=41)},
            timeout=60,
        )
        assert deployed.status_code == 201, deployed.text
        after = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert after.headers["X-Router-Version"] == "1"
        # JSON log lines, each with the router version.
        lines = [line for line in output.splitlines() if line.startswith("{")]
        assert lines and all('"router_version"' in line for line in lines)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
        redis_dir = tmp_path / "cache" / "redis"  # append-only file: redis 6 (file) or 7 (dir)
        assert any(p.name.startswith("appendonly") for p in redis_dir.iterdir())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
