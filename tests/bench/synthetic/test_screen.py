"""``roma-bench screen``: validation-only numbers for a benchmark model, through the CLI, on
the bundled model with the real trainer and the real embedder; the test split is never scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from roma_bench.cli import app
from roma_bench.synthetic.screen import RunSpec

pytestmark = pytest.mark.slow


def test_screen_reports_validation_only(tmp_path: Path) -> None:
    out = tmp_path / "screen"
    args = ["screen", "--small", "--out", str(out), "--run", "roma_knn:0.003:1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    found = json.loads((out / "screen.json").read_text())
    base, oracle = found["base"]["average"], found["oracle"]["average"]
    assert 0.0 <= base <= 1.0 and 0.0 <= oracle <= 1.0
    assert len(found["base"]["tasks"]) >= 6
    for name in ("domain_routing", "shared_routing"):
        assert 0.0 <= found[name]["average"] <= 1.0, name
        if oracle > base:
            assert found[name]["gap_closed"] == pytest.approx(
                (found[name]["average"] - base) / (oracle - base)
            )
    # The pool holds pretraining and adaptation phrasings only, each traced to its group.
    assert set(found["pool"]) == {"pretrain", "adapt"}
    assert all(0.0 <= a <= 1.0 for a in found["pool"].values())
    run = found["runs"]["roma_knn:0.003:1"]
    assert 0.0 <= run["average"] <= 1.0
    # Nothing scored the test split: the ledger's runs hold validation scores only.
    ledger = (out / "runs.jsonl").read_text()
    records = [json.loads(line) for line in ledger.splitlines()]
    runs = [r for r in records if "patch" in r]
    assert len(runs) == 1 and "val" in runs[0] and "test" not in runs[0]
    assert "Domain routing" in (out / "screen.md").read_text()
    assert "Domain routing" in result.output
    # A second screen reuses the ledger (diagnostics and runs) and reports the same.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert (out / "runs.jsonl").read_text() == ledger
    assert json.loads((out / "screen.json").read_text()) == found


@pytest.mark.parametrize("spec", ["sgd:0.01", "ce:fast", "roma_knn:0.01:1:2"])
def test_a_bad_run_spec_is_a_usage_error(spec: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["screen", "--out", str(tmp_path), "--run", spec])
    assert result.exit_code == 2
    assert "method[:lr[:lambda]]" in result.output or "must be numbers" in result.output
    assert not (tmp_path / "screen.json").exists()


def test_run_spec_round_trips() -> None:
    assert RunSpec.parse("roma_knn:0.01:1") == RunSpec("roma_knn", 0.01, 1.0)
    assert str(RunSpec.parse("ce")) == "ce"
    assert str(RunSpec.parse("l2:0.003:0.1")) == "l2:0.003:0.1"
