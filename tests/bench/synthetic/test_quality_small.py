"""The small quality benchmark runs end to end through the CLI, on the bundled benchmark model,
with the real trainer, the real MiniLM embedder and the oracle, and writes well-formed results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from roma_bench.cli import app
from roma_bench.protocol import LABELS, METHODS

pytestmark = pytest.mark.slow

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def small_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quality-small")
    result = CliRunner().invoke(app, ["quality", "--small", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_outputs_exist_and_are_well_formed(small_results: Path) -> None:
    results = json.loads((small_results / "quality.json").read_text())
    assert set(results["methods"]) == set(METHODS)
    tasks = set(results["base"]["test"]["tasks"])
    assert len(tasks) >= 6
    for name, stats in results["methods"].items():
        assert len(stats["test_runs"]) == len(results["config"]["seeds"]), name
        assert 0.0 <= stats["test_mean"] <= 1.0
        assert stats["test_std"] >= 0.0
        assert set(stats["tasks_mean"]) == tasks
    oracle, base = results["oracle"]["test"]["average"], results["base"]["test"]["average"]
    assert 0.0 <= base <= 1.0 and 0.0 <= oracle <= 1.0
    # The oracle starts from the base routing: its "before" is the base accuracy.
    assert results["oracle"]["test_before"]["average"] == pytest.approx(base)
    # The oracle's control steers toward a wrong choice: before, it is picked when gold is not.
    control = results["oracle_control"]
    assert 0.0 <= control["before"] <= 1.0 - base + 1e-6 and 0.0 <= control["after"] <= 1.0
    for factor in ("layers", "token", "k", "fraction", "embedder"):
        assert len(results["ablations"][factor]) >= 2, factor
    # Diagnostics: routing transplant and weight on the domain's own experts are fractions.
    assert 0.0 <= results["domain_routing"]["test"]["average"] <= 1.0
    # ... broken down by the held-out phrasing each test prompt was rendered from
    frames = results["domain_routing"]["test"]["frames"]
    assert sum(f["n"] for f in frames) == results["sizes"]["test"]
    assert all(f["frame"] != "?" for f in frames)
    assert {f["task"] for f in frames} == tasks
    # The task-shared routing oracle starts from the domain routing and has its own step size.
    shared = results["shared_routing"]
    assert 0.0 <= shared["test"]["average"] <= 1.0
    assert float(next(iter(shared["val_by_lr"]))) == shared["lr"]
    assert 0.0 < results["domain_mass"]["base"] < 1.0
    for name in METHODS:
        assert 0.0 < results["domain_mass"][name]["mean"] < 1.0, name
    # In distribution: the oracle and the domain-routing diagnostic on the pool's phrasings.
    iid = results["in_distribution"]
    for group in ("pretrain", "adapt"):
        assert 0.0 <= iid["oracle"][group] <= 1.0 and 0.0 <= iid["domain_routing"][group] <= 1.0
    # Paired differences to CE: same seeds, so their mean is the difference of the means.
    ce = results["methods"]["ce"]
    assert ce["vs_ce"] is None
    for name in set(METHODS) - {"ce"}:
        d = results["methods"][name]["vs_ce"]
        assert d["mean"] == pytest.approx(results["methods"][name]["test_mean"] - ce["test_mean"])
        assert d["low"] <= d["mean"] <= d["high"], name
    for png in ("quality_accuracy.png", "quality_routing.png"):
        assert (small_results / png).read_bytes().startswith(PNG)


def test_markdown_has_a_row_per_method(small_results: Path) -> None:
    text = (small_results / "quality.md").read_text()
    for label in LABELS.values():
        assert f"| {label} |" in text, label
    assert "gap closed" in text
    assert "Per held-out test phrasing" in text
    assert "| vs CE |" in text
    assert "Domain routing (diagnostic)" in text
    assert "| Best task-shared routing" in text


def test_every_run_is_a_distinct_real_patch(small_results: Path) -> None:
    """Different objectives on the same seed must give different router weights (a stubbed
    trainer or a cache keyed too coarsely would not), and every run trained its steps."""
    from roma_patch import read_patch

    records = (json.loads(line) for line in (small_results / "runs.jsonl").read_text().splitlines())
    runs = [r for r in records if "patch" in r]  # the ledger also caches the oracle
    # The eps-ball run is left out: in a 96-sample pool almost no prompt has a neighbour within
    # eps = 0.5, and with no neighbours RoMA's loss is exactly the CE (by design).
    seed0 = [
        r
        for r in runs
        if r["config"]["seed"] == 0
        and r["config"]["layers"] == "last5"
        and r["config"].get("neighbours") != "eps"
    ]
    weights = {
        b"".join(t.data for _, t in sorted(read_patch(r["patch"]).tensors.items())) for r in seed0
    }
    assert len(weights) == len(seed0)
    results = json.loads((small_results / "quality.json").read_text())
    assert all(r["train_metrics"]["steps"] == results["config"]["steps"] for r in runs)


def test_a_rerun_reuses_the_ledger_and_reports_the_same(small_results: Path) -> None:
    """A second invocation on the same --out trains and scores nothing again (every run,
    oracle and per-patch diagnostic is in runs.jsonl) and writes the same numbers."""
    ledger = (small_results / "runs.jsonl").read_text()
    configs = [json.loads(line)["config"] for line in ledger.splitlines()]
    patches = sum(1 for c in configs if "objective" in c)
    # Per final patch: its in-distribution scores and its weight on the domain's experts.
    assert sum("in_distribution_score" in c for c in configs) > 0
    assert sum("domain_mass" in c for c in configs) > 0
    assert sum("domain_mass" in c for c in configs) <= patches + 1  # + the base routers
    before = json.loads((small_results / "quality.json").read_text())
    result = CliRunner().invoke(app, ["quality", "--small", "--out", str(small_results)])
    assert result.exit_code == 0, result.output
    assert (small_results / "runs.jsonl").read_text() == ledger
    after = json.loads((small_results / "quality.json").read_text())
    reported = ("base", "oracle", "oracle_control", "methods", "ablations", "in_distribution")
    for key in (*reported, "domain_mass"):
        assert after[key] == before[key], key
    assert after["shared_routing"] == before["shared_routing"]


def test_a_rerun_without_the_patches_keeps_the_results_and_the_routing_plot(
    small_results: Path,
) -> None:
    """Patches are not committed: a re-run from the ledger alone writes the same results and
    leaves the routing plot (the one output that needs a patch file) as it was."""
    import shutil

    before = (small_results / "quality.json").read_text()
    plot = (small_results / "quality_routing.png").read_bytes()
    shutil.rmtree(small_results / "patches")
    result = CliRunner().invoke(app, ["quality", "--small", "--out", str(small_results)])
    assert result.exit_code == 0, result.output
    after = (small_results / "quality.json").read_text()
    assert json.loads(after) | {"seconds": 0} == json.loads(before) | {"seconds": 0}
    assert (small_results / "quality_routing.png").read_bytes() == plot
