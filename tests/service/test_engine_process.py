"""Starting the vLLM server: where it may listen, how it is started, and a failed start."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from roma_service.engine.errors import EngineStartError
from roma_service.engine.process import (
    EXTENSION,
    WORKER,
    EngineOptions,
    EngineProcess,
    check_private_host,
)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "8.8.8.8", "1.1.1.1"])
def test_refuses_public_or_wildcard_addresses(host: str) -> None:
    with pytest.raises(EngineStartError, match="refusing to bind"):
        check_private_host(host)
    with pytest.raises(EngineStartError, match="refusing to bind"):
        EngineProcess(EngineOptions(model="m", host=host))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "192.168.0.7", "::1"])
def test_accepts_loopback_and_private_addresses(host: str) -> None:
    check_private_host(host)


def test_command_and_environment_for_the_cpu(tiny_models: dict[str, Path]) -> None:
    engine = EngineProcess(
        EngineOptions(
            model=str(tiny_models["deepseek_v2"]),
            port=8123,
            device="cpu",
            extra_args=["--max-num-seqs", "8"],
        )
    )
    cmd = engine.command()
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]  # not the broken script
    assert cmd[cmd.index("--worker-extension-cls") + 1] == EXTENSION
    assert cmd[cmd.index("--worker-cls") + 1] == WORKER
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--dtype") + 1] == "float32"
    assert "--enforce-eager" in cmd
    assert cmd[-2:] == ["--max-num-seqs", "8"]
    env = engine.environment()
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["VLLM_MLA_DISABLE"] == "1"  # DeepSeek on the CPU
    assert engine.url == "http://127.0.0.1:8123"

    olmoe = EngineProcess(EngineOptions(model=str(tiny_models["olmoe"]), device="cpu"))
    # Only DeepSeek gets it (an outer environment's own setting passes through untouched).
    assert olmoe.environment().get("VLLM_MLA_DISABLE") == os.environ.get("VLLM_MLA_DISABLE")
    # vLLM's auto binding unless cores are given (engines sharing a host need disjoint ones).
    bind = "VLLM_CPU_OMP_THREADS_BIND"
    assert olmoe.environment().get(bind) == os.environ.get(bind)
    pinned = EngineOptions(model=str(tiny_models["olmoe"]), device="cpu", cpu_cores="2-3")
    assert EngineProcess(pinned).environment()[bind] == "2-3"
    # Router slots: the environment's unless given.
    assert olmoe.environment().get("ROMA_ROUTER_SLOTS") == os.environ.get("ROMA_ROUTER_SLOTS")
    slots = EngineOptions(model=str(tiny_models["olmoe"]), device="cpu", router_slots=6)
    assert EngineProcess(slots).environment()["ROMA_ROUTER_SLOTS"] == "6"

    gpu = EngineProcess(EngineOptions(model="allenai/OLMoE-1B-7B-0924", device="cuda"))
    assert "--enforce-eager" not in gpu.command()  # CUDA graphs stay on: the swap keeps them
    assert gpu.command()[gpu.command().index("--dtype") + 1] == "auto"


@pytest.mark.slow
def test_a_failed_start_says_why(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no_such_architecture"}')
    engine = EngineProcess(EngineOptions(model=str(broken), log_path=tmp_path / "engine.log"))
    started = time.monotonic()
    with pytest.raises(EngineStartError, match="exited with code") as err, engine:
        pass
    assert time.monotonic() - started < 300
    assert "no_such_architecture" in err.value.message  # the log's tail is in the error
    assert not engine.running
