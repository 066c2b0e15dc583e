"""``roma-bench`` is its own console script, and the trainer's CLI neither lists it nor pulls in
what only the benchmark needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def test_console_script_lists_its_commands() -> None:
    done = _run(str(BIN / "roma-bench"), "--help")
    assert done.returncode == 0, done.stderr
    for command in ("pretrain", "quality", "screen", "real"):
        assert command in done.stdout


@pytest.mark.parametrize(
    ("command", "option"),
    [
        ("pretrain", "--read-share"),
        ("quality", "--small"),
        ("screen", "--run"),
        ("real", "--dense"),
    ],
)
def test_commands_have_help(command: str, option: str) -> None:
    done = _run(str(BIN / "roma-bench"), command, "--help")
    assert done.returncode == 0, done.stderr
    assert option in done.stdout


def test_the_trainer_cli_has_no_bench_and_none_of_its_dependencies() -> None:
    done = _run(str(BIN / "roma-train"), "bench", "--help")
    assert done.returncode == 2 and "No such command 'bench'" in done.stderr
    imported = _run(
        sys.executable,
        "-c",
        "import sys, roma_trainer.cli; "
        "print(sorted(m for m in ('scipy', 'matplotlib', 'roma_bench') if m in sys.modules))",
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]"
