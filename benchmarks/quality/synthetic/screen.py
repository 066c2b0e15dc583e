"""``roma-bench screen``: how much routing can do for a benchmark model, on validation only.

Whether a model is a test of router tuning at all comes down to a few numbers on the validation
split: the base model's accuracy; the domain-routing diagnostic (routing at the tuned token set
to the task's success-set mean); the best routing shared by a task's samples (found with the
answers); the per-sample oracle; and, optionally, seed-0 runs of a few methods. A screen takes a
few minutes, against about 70 for a cold ``roma-bench quality``, and never scores the test split
(the Scorer and the ledger see validation only), so any number of model variants can be
screened without tuning on test. The pool's base accuracy per frame group says how many of its
samples fail, i.e. how much the success set leaves out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from roma_bench.oracle import base_correct
from roma_bench.protocol import LABELS, METHODS, QualityConfig
from roma_bench.report import pct
from roma_bench.results import Accuracy, Model
from roma_bench.stats import accuracy_by_task, gap_closed
from roma_bench.synthetic import tasks
from roma_bench.synthetic.quality import Quality


@dataclass(frozen=True)
class RunSpec:
    """``method[:lr[:lambda]]``, e.g. ``ce:0.01`` or ``roma_knn:0.01:1``."""

    method: str
    lr: float | None = None
    lam: float | None = None

    @classmethod
    def parse(cls, text: str) -> RunSpec:
        method, *numbers = text.split(":")
        if method not in METHODS or len(numbers) > 2:
            raise ValueError(
                f"{text!r}: expected method[:lr[:lambda]] with method one of {', '.join(METHODS)}"
            )
        try:
            values = [float(n) for n in numbers]
        except ValueError as err:
            raise ValueError(f"{text!r}: lr and lambda must be numbers") from err
        return cls(method, *values)

    def __str__(self) -> str:
        return ":".join([self.method, *(f"{v:g}" for v in (self.lr, self.lam) if v is not None)])


class TunedAccuracy(Model):
    """An oracle's validation accuracy at the step size validation picked."""

    lr: float
    tasks: dict[str, float]
    average: float


class Bound(Accuracy):
    gap_closed: float | None


class TunedBound(TunedAccuracy):
    gap_closed: float | None


class ScreenFound(Model):
    """What a screen caches in its ledger: everything but the method runs."""

    base: Accuracy
    pool: dict[str, float]  # base accuracy on the training pool by frame group
    oracle: TunedAccuracy
    shared_routing: TunedAccuracy
    domain_routing: Accuracy  # where the task-shared routing oracle starts


class ScreenResult(Model):
    model: str
    base: Accuracy
    pool: dict[str, float]
    oracle: TunedAccuracy
    shared_routing: TunedBound
    domain_routing: Bound
    runs: dict[str, Bound]  # by RunSpec


def screen(cfg: QualityConfig, runs: list[RunSpec]) -> ScreenResult:
    """The numbers of the module docstring; also written to ``cfg.out``/screen.{json,md}."""
    quality = Quality(cfg, scored=("val",))
    val, pool = quality.samples["val"], quality.samples["train"]

    # Cached in the screen's ledger, so a second screen that only adds --run is quick.
    def diagnostics() -> ScreenFound:
        model, tok, _ = quality.base_model()
        by_group: dict[str, list[bool]] = {}
        for sample, ok in zip(pool, base_correct(model, tok, pool), strict=True):
            found = tasks.frame_of(sample.task, sample.prompt)
            by_group.setdefault(found[0] if found else "other", []).append(ok)
        base = accuracy_by_task(val, base_correct(model, tok, val))
        oracle_lr, oracle = quality.oracle_search()
        shared_lr, shared = quality.shared_search()
        return ScreenFound(
            base=base,
            pool={g: sum(v) / len(v) for g, v in sorted(by_group.items())},
            oracle=TunedAccuracy(lr=oracle_lr, **dict(oracle[oracle_lr])),
            shared_routing=TunedAccuracy(lr=shared_lr, **dict(shared[shared_lr][0])),
            domain_routing=shared[shared_lr][1],
        )

    key = {
        "screen": True,
        "oracle": [cfg.oracle_steps, *cfg.oracle_lr_grid],
        "shared": [cfg.shared_steps, *cfg.shared_lr_grid],
    }
    found = quality.cached(key, ScreenFound, diagnostics)

    def gap(acc: Accuracy | TunedAccuracy) -> float | None:
        return gap_closed(acc.average, found.base.average, found.oracle.average)

    specs = {
        str(spec): quality.run(spec.method, seed=cfg.seeds[0], lr=spec.lr, lam=spec.lam).val
        for spec in runs
    }
    result = ScreenResult(
        model=quality.model,
        base=found.base,
        pool=found.pool,
        oracle=found.oracle,
        shared_routing=TunedBound(
            **dict(found.shared_routing), gap_closed=gap(found.shared_routing)
        ),
        domain_routing=Bound(**dict(found.domain_routing), gap_closed=gap(found.domain_routing)),
        runs={name: Bound(**dict(acc), gap_closed=gap(acc)) for name, acc in specs.items()},
    )
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "screen.json").write_text(json.dumps(result.model_dump(), indent=2) + "\n")
    (cfg.out / "screen.md").write_text(render(result))
    return result


def render(result: ScreenResult) -> str:
    shared, oracle = result.shared_routing, result.oracle
    rows: list[tuple[str, float, float | None]] = [
        ("Base", result.base.average, None),
        (
            "Domain routing (diagnostic)",
            result.domain_routing.average,
            result.domain_routing.gap_closed,
        ),
        (f"Task-shared routing (step {shared.lr:g})", shared.average, shared.gap_closed),
        *(
            (f"{LABELS[spec.split(':')[0]]} `{spec}`, seed 0", r.average, r.gap_closed)
            for spec, r in result.runs.items()
        ),
        (f"Oracle (step {oracle.lr:g})", oracle.average, None),
    ]
    lines = [
        f"# Screen of {result.model} (validation split only)",
        "",
        "| | validation % | share of the oracle's gap % |",
        "|---|---|---|",
        *(f"| {name} | {pct(avg, '-')} | {pct(gap, '-')} |" for name, avg, gap in rows),
        "",
        "Base accuracy on the training pool by frame group (the success set is what it answers): "
        + ", ".join(f"{g} {pct(a, '-')} %" for g, a in result.pool.items()),
        "",
    ]
    return "\n".join(lines)
