"""``roma-models build``: bad input exits 2 before the (50 s) model load, naming the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from roma_models.cli import app


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["build", "llama-moe"], "unknown model 'llama-moe'; buildable: smollm2-moe"),
        (["build", "smollm2-moe", "--experts", "7"], "do not split into 7 equal experts"),
        (["build", "smollm2-moe", "--top-k", "17"], "top_k must be in 1..16"),
        (["build", "smollm2-moe", "--moe-layers", "31"], "moe_layers must be in 1..30"),
    ],
)
def test_bad_input_exits_2(tmp_path: Path, args: list[str], words: str) -> None:
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "m")])
    assert result.exit_code == 2, result.output
    assert words in result.output.replace("\n", "")
    assert not (tmp_path / "m").exists()
