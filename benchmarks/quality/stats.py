"""The statistics a quality report states: accuracy by task, the share of the base->oracle gap
a method closes, mean and spread over seeds, and differences between methods paired by seed."""

from __future__ import annotations

from collections.abc import Sequence
from statistics import mean, pstdev, stdev

from roma_bench.results import Accuracy, MethodStats, PairedDifference, RunRecord, SeedStats
from roma_trainer.data import Sample


def accuracy_by_task(samples: Sequence[Sample], correct: Sequence[bool]) -> Accuracy:
    by_task: dict[str, list[bool]] = {}
    for s, ok in zip(samples, correct, strict=True):
        by_task.setdefault(s.task, []).append(ok)
    accs = {t: sum(v) / len(v) for t, v in sorted(by_task.items())}
    return Accuracy(tasks=accs, average=mean(accs.values()))


def best_on_val(grid: tuple[float, ...], val: dict[float, float]) -> float:
    """The grid point with the best validation accuracy; ties go to the earlier point."""
    return max(grid, key=lambda x: (val[x], -grid.index(x)))


def gap_closed(acc: float, base: float, oracle: float) -> float | None:
    """Share of the base->oracle gap that ``acc`` closes (None when there is no gap)."""
    return None if oracle <= base else (acc - base) / (oracle - base)


def seed_stats(runs: Sequence[RunRecord], base: Accuracy, oracle: Accuracy) -> SeedStats:
    """Mean/std over seeds of the test (and val) accuracy, per task and on average; ``base``
    and ``oracle`` are the test accuracies the gap is measured between."""
    test = [_test(r).average for r in runs]
    metrics = [r.train_metrics for r in runs]
    return SeedStats(
        test_mean=mean(test),
        test_std=pstdev(test),
        test_runs=test,
        val_mean=mean(r.val.average for r in runs),
        tasks_mean={t: mean(_test(r).tasks[t] for r in runs) for t in _test(runs[0]).tasks},
        gap_closed=gap_closed(mean(test), base.average, oracle.average),
        train_acc_after=mean(m.get("train_acc_after", 0.0) for m in metrics),
        with_neighbours=mean(
            1 - m["samples_without_neighbours"] / m["num_samples"] for m in metrics
        )
        if "samples_without_neighbours" in metrics[0]
        else None,
        train_seconds=mean(r.train_seconds for r in runs),
        patches=[r.patch for r in runs],
    )


def paired_difference(
    runs: Sequence[RunRecord], reference: Sequence[RunRecord]
) -> PairedDifference | None:
    """Test-accuracy difference to ``reference``, seed by seed: a seed fixes the batch order,
    so the pairs share it and the spread left is the method's. Mean and a two-sided 95 %
    Student-t interval over the seeds (None with fewer than two shared seeds)."""
    from scipy import stats

    ref = {r.seed: _test(r).average for r in reference}
    diffs = [_test(r).average - ref[r.seed] for r in runs if r.seed in ref]
    if len(diffs) < 2:
        return None
    half = float(stats.t.ppf(0.975, len(diffs) - 1)) * stdev(diffs) / len(diffs) ** 0.5
    return PairedDifference(mean=mean(diffs), low=mean(diffs) - half, high=mean(diffs) + half)


def summarise(
    finals: dict[str, list[RunRecord]], base: Accuracy, oracle: Accuracy
) -> dict[str, MethodStats]:
    """Every method's seed statistics and its paired difference to CE-only."""
    return {
        m: MethodStats(
            **dict(seed_stats(runs, base, oracle)),
            vs_ce=paired_difference(runs, finals["ce"]) if m != "ce" else None,
        )
        for m, runs in finals.items()
    }


def ablation_stats(
    ablations: dict[str, dict[str, list[RunRecord]]], base: Accuracy, oracle: Accuracy
) -> dict[str, dict[str, SeedStats]]:
    """Seed statistics of every ablation setting, factor by factor."""
    return {
        factor: {name: seed_stats(runs, base, oracle) for name, runs in options.items()}
        for factor, options in ablations.items()
    }


def _test(run: RunRecord) -> Accuracy:
    if run.test is None:
        raise ValueError(f"run {run.key} has no test scores (a validation-only screen run)")
    return run.test
