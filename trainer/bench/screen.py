"""``roma-train bench screen``: how much routing can do for a benchmark model, on validation only.

Every design question of the benchmark ("is this model a test of router tuning at all?") has
come down to the same few numbers, and each used to be a one-off script: on the validation
split, the base model's accuracy; the domain-routing diagnostic (routing at the tuned token set
to the task's success-set mean); the best routing shared by a task's samples (found with the
answers); the per-sample oracle; and, optionally, seed-0 runs of a few methods. A full
``bench quality`` run takes about 70 minutes cold; this takes a few and never scores the test
split (the Scorer and the ledger see validation only), so any number of model variants can be
screened without tuning on test. The pool's base accuracy per frame group says how many of its
samples fail, i.e. how much the success set leaves out.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from roma_trainer.bench import tasks
from roma_trainer.bench.quality import (
    LABELS,
    METHODS,
    Quality,
    QualityConfig,
    accuracy_by_task,
    gap_closed,
)

log = logging.getLogger("roma_trainer.bench")


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


def screen(cfg: QualityConfig, runs: list[RunSpec]) -> dict[str, Any]:
    """The numbers of the module docstring; also written to ``cfg.out``/screen.{json,md}."""
    from roma_trainer.bench.oracle import base_correct

    quality = Quality(cfg, scored=("val",))
    val, pool = quality.samples["val"], quality.samples["train"]

    # Cached in the screen's ledger, so a second screen that only adds --run is quick.
    def diagnostics() -> dict[str, Any]:
        model, tok, _ = quality.base_model()
        out: dict[str, Any] = {"base": accuracy_by_task(val, base_correct(model, tok, val))}
        by_group: dict[str, list[bool]] = {}
        for sample, ok in zip(pool, base_correct(model, tok, pool), strict=True):
            found = tasks.frame_of(sample.task, sample.prompt)
            by_group.setdefault(found[0] if found else "other", []).append(ok)
        out["pool"] = {g: sum(v) / len(v) for g, v in sorted(by_group.items())}

        lr, oracle = quality.oracle_search()
        out["oracle"] = {"lr": lr, **oracle[lr]}
        lr, shared = quality.shared_search()
        out["shared_routing"] = {"lr": lr, **shared[lr][0]}
        out["domain_routing"] = shared[lr][1]  # where the shared oracle starts
        return out

    key = {
        "screen": True,
        "oracle": [cfg.oracle_steps, *cfg.oracle_lr_grid],
        "shared": [cfg.shared_steps, *cfg.shared_lr_grid],
    }
    result: dict[str, Any] = {"model": quality.model, **quality.cached(key, diagnostics)}
    base = result["base"]
    result["runs"] = {
        str(spec): quality.run(spec.method, seed=cfg.seeds[0], lr=spec.lr, lam=spec.lam)["val"]
        for spec in runs
    }
    for entry in (result["domain_routing"], result["shared_routing"], *result["runs"].values()):
        entry["gap_closed"] = gap_closed(
            entry["average"], base["average"], result["oracle"]["average"]
        )

    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "screen.json").write_text(json.dumps(result, indent=2) + "\n")
    (cfg.out / "screen.md").write_text(render(result))
    return result


def render(result: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    shared, oracle = result["shared_routing"], result["oracle"]
    runs = result["runs"].items()
    rows = [
        ("Base", result["base"]),
        ("Domain routing (diagnostic)", result["domain_routing"]),
        (f"Task-shared routing (step {shared['lr']:g})", shared),
        *((f"{LABELS[spec.split(':')[0]]} `{spec}`, seed 0", r) for spec, r in runs),
        (f"Oracle (step {oracle['lr']:g})", oracle),
    ]
    lines = [
        f"# Screen of {result['model']} (validation split only)",
        "",
        "| | validation % | share of the oracle's gap % |",
        "|---|---|---|",
        *(f"| {name} | {pct(r['average'])} | {pct(r.get('gap_closed'))} |" for name, r in rows),
        "",
        "Base accuracy on the training pool by frame group (the success set is what it answers): "
        + ", ".join(f"{g} {pct(a)} %" for g, a in result["pool"].items()),
        "",
    ]
    return "\n".join(lines)
