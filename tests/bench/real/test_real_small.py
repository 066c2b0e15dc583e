"""The small real benchmark runs end to end through the CLI on a tiny OLMoE with real OLMES
data, the real trainer and the real MiniLM embedder: every method and reference is reported,
validation picks the settings, test only reports, out-of-set tasks are scored, and a second
invocation reuses the ledger."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from roma_bench.cli import app
from roma_bench.protocol import LABELS, METHODS
from roma_bench.real.quality import SMALL_TASKS
from roma_bench.real.splits import OUT_OF_SET
from roma_bench.stats import best_on_val

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory, tiny_olmoe: Path) -> tuple[Path, set[str]]:
    """A helper worker (``--only l1,ablations``) fills the ledger first; the keys of its runs
    (L1's, and RoMA k-NN's: its search, which the ablations need, and the ablations)."""
    out = tmp_path_factory.mktemp("real-small")
    args = ["real", "--small", "--model", str(tiny_olmoe), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--only", "l1,ablations"])
    assert result.exit_code == 0, result.output
    assert not (out / "real.md").exists()  # a helper writes no report
    return out, {r["key"] for r in _ledger(out) if "config" in r}


@pytest.fixture(scope="module")
def small(helper: tuple[Path, set[str]], tiny_olmoe: Path) -> Path:
    out, _ = helper
    args = ["real", "--small", "--model", str(tiny_olmoe), "--out", str(out)]
    # The "dense" reference: any causal LM scores; the tiny OLMoE stands in for one.
    result = CliRunner().invoke(app, [*args, "--dense", str(tiny_olmoe)])
    assert result.exit_code == 0, result.output
    return out


def test_the_full_run_reuses_a_helper_workers_runs(
    small: Path, helper: tuple[Path, set[str]]
) -> None:
    _, helped = helper
    trained = [r for r in _ledger(small) if "config" in r]
    # Every run the helper trained is in the ledger once: the full run trained none of them.
    assert helped <= {r["key"] for r in trained}
    assert len(trained) == len({r["key"] for r in trained})
    by_helper = [r["config"] for r in trained if r["key"] in helped]
    assert {c.get("objective") for c in by_helper} >= {"l1"}
    assert any(c.get("token") == "first" for c in by_helper)  # an ablation
    results = json.loads((small / "real.json").read_text())
    assert len(results["methods"]["l1"]["test_runs"]) == len(results["config"]["seeds"])
    assert results["ablations"]["token"]["first"]["test_runs"]


def test_a_helper_refuses_unknown_methods(tmp_path: Path, tiny_olmoe: Path) -> None:
    args = ["real", "--small", "--model", str(tiny_olmoe), "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--only", "ce,l3"])
    assert result.exit_code == 2 and "l3" in result.output and "roma_knn" in result.output
    assert not (tmp_path / "runs.jsonl").exists()


def _ledger(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def test_every_method_task_and_reference_is_reported(small: Path) -> None:
    results = json.loads((small / "real.json").read_text())
    assert set(results["methods"]) == set(METHODS)
    assert set(results["base"]["test"]["tasks"]) == set(SMALL_TASKS)
    for name, stats in results["methods"].items():
        assert len(stats["test_runs"]) == len(results["config"]["seeds"]), name
    refs = results["references"]
    assert set(refs["all_experts"]["tasks"]) == set(SMALL_TASKS)
    # The stand-in dense model is the MoE itself: it scores exactly the base routers.
    assert refs["dense"] == results["base"]["test"]
    assert results["oracle"]["test_before"]["average"] == pytest.approx(
        results["base"]["test"]["average"]
    )
    for factor in ("layers", "token", "k", "fraction", "embedder"):
        assert len(results["ablations"][factor]) >= 2, factor
    assert {g["name"].split(" ")[0] for g in results["goals"]} >= {"closes", "beats"}
    # RoMA's premise: its base row is the base routers' test accuracy, task by task.
    premise = results["neighbour_routing"]
    assert premise["base"] == results["base"]["test"] and premise["k"] == 3
    assert set(premise["knn"]["tasks"]) == set(premise["random"]["tasks"]) == set(SMALL_TASKS)
    text = (small / "real.md").read_text()
    for label in LABELS.values():
        assert f"| {label} |" in text, label
    assert "| MoE, all experts |" in text and "| Dense model |" in text
    assert "| Mean of its 3 nearest successful neighbours |" in text
    assert (small / "real_accuracy.png").read_bytes().startswith(b"\x89PNG")


def test_out_of_set_tasks_score_the_base_ce_and_roma_patches(small: Path) -> None:
    results = json.loads((small / "real.json").read_text())
    found = results["out_of_set"]
    assert set(found["sizes"]) == set(OUT_OF_SET)
    assert set(found["base"]["tasks"]) == set(OUT_OF_SET)
    assert set(found["methods"]) == {"ce", "roma_knn"}
    roma = found["methods"]["roma_knn"]
    assert roma["patches"] == results["methods"]["roma_knn"]["patches"]
    ce = found["methods"]["ce"]["test_mean"]
    assert found["vs_ce"]["roma_knn"]["mean"] == pytest.approx(roma["test_mean"] - ce)
    in_set = {json.loads(x)["prompt"] for x in (small / "data" / "train.jsonl").open()}
    out = [json.loads(x) for x in (small / "data" / "out_of_set.jsonl").open()]
    assert not in_set & {r["prompt"] for r in out}
    assert "Out-of-set tasks" in (small / "real.md").read_text()


def test_validation_picks_and_test_only_reports(small: Path) -> None:
    """The search's winner is the grid point with the best validation accuracy; the finals
    run that setting; training read only the pool."""
    results = json.loads((small / "real.json").read_text())
    runs = [r for r in _ledger(small) if "patch" in r]
    for method, search in results["search"].items():
        grid = search["grid"]
        best = grid[best_on_val(tuple(range(len(grid))), {i: p["val"] for i, p in enumerate(grid)})]
        assert search["best"] == {"lr": best["lr"], "lam": best["lam"]}, method
    assert {r["config"]["data"] for r in runs} <= {
        str(small / "data" / "train.jsonl"),
        *(str(p) for p in (small / "data").glob("train_*pct.jsonl")),
    }
    test = {json.loads(x)["prompt"] for x in (small / "data" / "test.jsonl").open()}
    val = {json.loads(x)["prompt"] for x in (small / "data" / "val.jsonl").open()}
    pool = {json.loads(x)["prompt"] for x in (small / "data" / "train.jsonl").open()}
    assert not (test & val or test & pool or val & pool)


def test_a_rerun_reuses_the_ledger_and_reports_the_same(small: Path, tiny_olmoe: Path) -> None:
    ledger = (small / "runs.jsonl").read_text()
    configs = [r["config"] for r in _ledger(small)]
    assert sum("out_of_set_score" in c for c in configs) > 0
    assert sum("reference" in c for c in configs) == 2
    before = json.loads((small / "real.json").read_text())
    args = ["real", "--small", "--model", str(tiny_olmoe), "--out", str(small)]
    result = CliRunner().invoke(app, [*args, "--dense", str(tiny_olmoe)])
    assert result.exit_code == 0, result.output
    assert (small / "runs.jsonl").read_text() == ledger
    after = json.loads((small / "real.json").read_text())
    assert after | {"seconds": 0} == before | {"seconds": 0}


def test_the_model_is_required() -> None:
    result = CliRunner().invoke(app, ["real", "--small"])
    assert result.exit_code == 2
    assert "roma-models build smollm2-moe" in result.output


def test_a_run_whose_patch_is_gone_is_trained_again(small: Path) -> None:
    """The ledger travels with the repository, patches do not: a resumed benchmark re-makes
    the patch of a ledger run (same config and seed) for the diagnostics that score it."""
    from safetensors.torch import load_file

    from roma_bench.results import RunRecord
    from roma_bench.runs import patch_file

    run = RunRecord.model_validate(next(r for r in _ledger(small) if "patch" in r))
    before = load_file(run.patch)
    Path(run.patch).unlink()
    assert patch_file(run) == run.patch
    after = load_file(run.patch)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert (after[name] - tensor).abs().max() <= 1e-6, name


def test_progress_reads_the_ledger_alone(small: Path) -> None:
    """`roma-bench progress` agrees with the finished report: every method's winning setting
    with every seed, each search's grid points, and RoMA's paired difference to CE-only."""
    results = json.loads((small / "real.json").read_text())
    ledger = (small / "runs.jsonl").read_text()
    result = CliRunner().invoke(app, ["progress", "--out", str(small)])
    assert result.exit_code == 0, result.output
    assert (small / "runs.jsonl").read_text() == ledger
    text = result.output
    base = results["base"]
    assert (
        f"val {100 * base['val']['average']:.1f}, test {100 * base['test']['average']:.1f}" in text
    )
    seeds = ",".join(str(s) for s in sorted(results["config"]["seeds"]))
    for method, search in results["search"].items():
        lam = search["best"]["lam"]
        setting = f"{search['best']['lr']:g} | {'-' if lam is None else f'{lam:g}'}"
        # The eps-ball's runs name their radius (the benchmark's own, not the paper's 0.5).
        label = LABELS[method] + (f" (eps {results['config']['eps']:g})" * (method == "roma_eps"))
        row = f"| {label} | {setting} | {seeds} |"
        assert row in text, (method, row)
        assert text.count(f"| {label} |") == len(search["grid"]), method
    vs = results["methods"]["roma_knn"]["vs_ce"]
    assert f"- {LABELS['roma_knn']}: {100 * vs['mean']:+.1f} [" in text
    oracle, premise = results["oracle"], results["neighbour_routing"]
    before, after = (100 * oracle[k]["average"] for k in ("test_before", "test"))
    assert f"): test {before:.1f} -> {after:.1f}" in text
    assert f"neighbours'): {100 * premise['knn']['average']:.1f};" in text
    assert "- Oracle control (toward a random wrong choice)" in text
    # Every ablation setting, by what it changes, with its seeds and test mean.
    ablation_seeds = ",".join(str(s) for s in sorted(results["config"]["ablation_seeds"]))
    shown = {
        "layers=last1": ("layers", "last1"),
        "token=first": ("token", "first"),
        "k=1": ("k", "1"),
        "data=train_50pct.jsonl": ("fraction", "50%"),
        "embedder=random-minilm": ("embedder", "random-init MiniLM"),
    }
    for change, (factor, name) in shown.items():
        mean = 100 * results["ablations"][factor][name]["test_mean"]
        assert re.search(
            rf"\| {re.escape(change)} \| [^|]+ \| [^|]+ \| {ablation_seeds} \| {mean:.1f} \|", text
        ), change


def test_progress_of_a_folder_without_a_ledger_says_so(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["progress", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "nothing has run there" in result.output
