"""The embedded set-up's local state: one Redis folder per instance (locked), a reset for it,
and roma-serve refusing, before it starts anything, what cannot work. Real redis-server
processes; no engine (roma-serve stops before it would start one)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from roma_service.cli import served_model_name
from roma_service.registry.local import FolderInUse, LocalRedis, free_port


def _serve(*args: str, cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """roma-serve as a user runs it, with its own state folder (and nothing else from ROMA_*)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ROMA_")}
    return subprocess.run(
        [sys.executable, "-m", "roma_service.cli", *args],
        env={**base, "ROMA_CACHE_DIR": str(cache), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_relative_folder_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quick start's default ROMA_CACHE_DIR is relative (runs/quickstart/state)."""
    monkeypatch.chdir(tmp_path)
    with LocalRedis(Path("state") / "redis") as redis:
        assert redis.url.startswith("redis://127.0.0.1:")
    assert (tmp_path / "state" / "redis" / "redis.log").is_file()


def test_a_second_server_on_one_folder_is_refused_with_the_holder(tmp_path: Path) -> None:
    first = LocalRedis(tmp_path / "redis").start()
    second = LocalRedis(tmp_path / "redis")
    try:
        with pytest.raises(FolderInUse) as refused:
            second.start()
        message = str(refused.value)
        assert f"roma-serve PID {os.getpid()}" in message
        assert f"redis-server PID {first.process.pid}" in message  # type: ignore[union-attr]
        assert "ROMA_CACHE_DIR" in message and "ROMA_REDIS_URL" in message
        assert second.process is None
        first.stop()
        second.start()  # free once the first one stopped
    finally:
        first.stop()
        second.stop()


def test_the_folder_stays_locked_while_an_orphaned_server_runs(tmp_path: Path) -> None:
    """The process that started Redis dies without stopping it (SIGKILL): the server it left
    behind still holds the folder, so no second server can start beside it."""
    script = (
        "import sys, time; from roma_service.registry.local import LocalRedis; "
        "LocalRedis(sys.argv[1]).start(); print('up', flush=True); time.sleep(600)"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "redis")], stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout is not None and owner.stdout.readline().strip() == "up"
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    with pytest.raises(FolderInUse) as refused:
        LocalRedis(tmp_path / "redis").start()
    orphan = int(re.search(r"redis-server PID (\d+)", str(refused.value)).group(1))  # type: ignore[union-attr]
    os.kill(orphan, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while True:
        try:
            LocalRedis(tmp_path / "redis").start().stop()
            break
        except FolderInUse:
            assert time.monotonic() < deadline, "the folder stayed locked after Redis exited"
            time.sleep(0.1)


def test_reset_removes_the_data_only_when_no_server_runs(tmp_path: Path) -> None:
    server = LocalRedis(tmp_path / "redis").start()
    try:
        with pytest.raises(FolderInUse):
            LocalRedis.reset(tmp_path / "redis")
    finally:
        server.stop()
    removed = {p.name for p in LocalRedis.reset(tmp_path / "redis")}
    assert "redis.log" in removed and any(n.startswith("appendonly") for n in removed)
    assert [p.name for p in (tmp_path / "redis").iterdir()] == ["roma.lock"]


def test_roma_serve_refuses_a_folder_in_use_before_starting_anything(tmp_path: Path) -> None:
    held = LocalRedis(tmp_path / "cache" / "redis").start()
    try:
        result = _serve("--port", "1", cache=tmp_path / "cache")
        assert result.returncode == 2, result.stderr
        assert f"redis-server PID {held.process.pid}" in result.stderr  # type: ignore[union-attr]
        assert "ROMA_CACHE_DIR" in result.stderr
        assert "engine starting" not in result.stderr
        again = _serve("--reset-state", cache=tmp_path / "cache")
        assert again.returncode == 2 and "--reset-state" in again.stderr
        assert any(p.name.startswith("appendonly") for p in held.data_dir.iterdir())
    finally:
        held.stop()


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--engine-url", "http://127.0.0.1:9", "--max-model-len", "64"], {}, "--max-model-len"),
        (["--api-key", "k"], {}, "ROMA_API_KEYS"),
        (["--reset-state"], {"ROMA_REDIS_URL": "redis://127.0.0.1:9/0"}, "POST /routers/0"),
    ],
)
def test_roma_serve_refuses_options_that_cannot_work(
    tmp_path: Path, args: list[str], env: dict[str, str], says: str
) -> None:
    result = _serve(*args, cache=tmp_path, **env)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr


def test_the_served_name_is_never_an_absolute_path(tmp_path: Path) -> None:
    assert served_model_name(str(tmp_path)) == tmp_path.name
    assert served_model_name("allenai/OLMoE-1B-7B-0924") == "allenai/OLMoE-1B-7B-0924"


def test_open_openai_routes_beyond_loopback_are_warned_about(tmp_path: Path) -> None:
    """Listening on every interface without ROMA_API_KEYS: a warning naming the setting, before
    the gateway serves anything."""
    port = free_port()
    with LocalRedis(tmp_path / "redis") as redis:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROMA_")}
        env.update(ROMA_CACHE_DIR=str(tmp_path), ROMA_REDIS_URL=redis.url)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "roma_service.cli",
                "--engine-url",
                "http://127.0.0.1:9",
                "--host",
                "0.0.0.0",
                "--port",
                str(port),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not _answers(f"http://127.0.0.1:{port}/health"):
                assert proc.poll() is None and time.monotonic() < deadline, "never served"
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=60)
    warnings = [line for line in output.splitlines() if '"warning"' in line]
    assert any("set ROMA_API_KEYS" in line for line in warnings), output


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
