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


def test_default_is_the_build_in_the_models_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_olmoe: Path
) -> None:
    """`roma-models default` (and roma-serve/roma-train without --model) use the build kept in
    ROMA_MODELS_DIR without building again; unset, the folder is ROMA_CACHE_DIR/models."""
    from roma_models import default_model_dir, models_root

    monkeypatch.delenv("ROMA_MODELS_DIR", raising=False)
    monkeypatch.setenv("ROMA_CACHE_DIR", str(tmp_path / "state"))
    assert models_root() == tmp_path / "state" / "models"

    models = tmp_path / "models"
    monkeypatch.setenv("ROMA_MODELS_DIR", str(models))
    built = models / "smollm2-moe"
    built.mkdir(parents=True)
    (built / "config.json").write_text((tiny_olmoe / "config.json").read_text())
    stamp = (built / "config.json").stat().st_mtime_ns
    assert default_model_dir() == built
    result = CliRunner().invoke(app, ["default"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(built)
    assert (built / "config.json").stat().st_mtime_ns == stamp  # found, not rebuilt
