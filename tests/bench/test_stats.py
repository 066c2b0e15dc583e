"""The statistics the quality report states: paired differences between methods."""

from __future__ import annotations

import pytest

from roma_bench.results import Accuracy, RunRecord
from roma_bench.stats import paired_difference


def _run(seed: int, acc: float) -> RunRecord:
    score = Accuracy(tasks={"task": acc}, average=acc)
    return RunRecord(
        key=f"run-{seed}",
        config={"seed": seed},
        patch=f"{seed}.safetensors",
        train_seconds=1.0,
        train_metrics={},
        val=score,
        test=score,
    )


def test_paired_difference_pairs_runs_by_seed_and_gives_a_t_interval() -> None:
    reference = [_run(0, 0.50), _run(1, 0.40), _run(2, 0.60)]
    # Listed out of seed order: pairing must go by seed, not by position.
    runs = [_run(2, 0.63), _run(0, 0.51), _run(1, 0.42)]
    d = paired_difference(runs, reference)
    assert d is not None
    # Differences 0.01, 0.02, 0.03: mean 0.02, sample std 0.01, t(0.975, 2) = 4.3027.
    assert d.mean == pytest.approx(0.02)
    half = 4.302653 * 0.01 / 3**0.5
    assert d.low == pytest.approx(0.02 - half, abs=1e-6)
    assert d.high == pytest.approx(0.02 + half, abs=1e-6)


def test_paired_difference_needs_two_shared_seeds() -> None:
    assert paired_difference([_run(0, 0.5), _run(5, 0.6)], [_run(0, 0.4), _run(1, 0.4)]) is None


def test_the_real_goals_judge_roma_on_the_measured_numbers() -> None:
    """Each goal is met or not from the numbers it shows: the gap share, the paired margin over
    CE with its interval, and RoMA's paired difference to every rival (a win needs its interval
    above 0, not only a higher mean)."""
    from roma_bench.real.report import RIVALS, goals
    from roma_bench.results import MethodStats, PairedDifference

    def stats(test: float, vs_ce: PairedDifference | None = None) -> MethodStats:
        return MethodStats(
            test_mean=test, test_std=0.0, test_runs=[test], val_mean=test, tasks_mean={},
            gap_closed=(test - 0.5) / 0.2, train_acc_after=0.0, with_neighbours=None,
            train_seconds=1.0, patches=[], vs_ce=vs_ce,
        )  # fmt: skip

    margin = PairedDifference(mean=0.04, low=0.01, high=0.07)
    methods = {"roma_knn": stats(0.64, margin), **{r: stats(0.60) for r in RIVALS}}
    methods["l2"] = stats(0.66)
    vs_rivals = {r: PairedDifference(mean=0.04, low=0.01, high=0.07) for r in RIVALS}
    vs_rivals["l2"] = PairedDifference(mean=-0.02, low=-0.05, high=0.01)
    vs_rivals["entropy"] = PairedDifference(mean=0.04, low=-0.01, high=0.09)  # higher, in noise
    vs_rivals["random"] = None  # no seeds in common
    found = {g.name.split(" (")[0]: g for g in goals(methods, vs_rivals)}
    assert found["closes >= 64 % of the base -> oracle gap"].met  # (0.64 - 0.5) / 0.2 = 70 %
    assert found["beats CE-only by >= 3 points, 95 % interval above 0"].met
    assert found["beats L1"].met and not found["beats L2"].met
    assert not found["beats Entropy"].met and not found["beats Random neighbours"].met
    assert found["beats L1"].value == "64.0 vs 60.0, paired +4.0 [+1.0, +7.0]"
    # A margin whose interval reaches 0 is not met, however large its mean.
    methods["roma_knn"] = stats(0.64, PairedDifference(mean=0.05, low=-0.01, high=0.11))
    found = {g.name: g for g in goals(methods, vs_rivals)}
    assert not found["beats CE-only by >= 3 points, 95 % interval above 0"].met
