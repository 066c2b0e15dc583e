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
