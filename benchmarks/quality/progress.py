"""Where a long benchmark stands, read from its ledger alone: nothing is trained or scored.

The final report (``real.md``, ``quality.md``) is written only when every step is done, which on
two cores takes many sessions. This summary shows what the ledger already holds: every method's
grid points (val with seed 0, test), the seeds finished at each setting, the paired test
difference to CE-only wherever both have two or more seeds at their most-seeded setting, and
the ablation runs finished so far.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from roma_bench.protocol import LABELS, METHODS
from roma_bench.report import difference, pct
from roma_bench.results import (
    Accuracy,
    NeighbourRouting,
    OracleControl,
    OracleFound,
    RunRecord,
)
from roma_bench.runs import Ledger
from roma_bench.stats import paired_difference

# Config keys that vary inside one method's search and seeds; any other difference from the
# protocol's defaults (layers, token, data, k, embedder, ...) makes a run an ablation.
_VARIED = {"seed", "lr", "lam", "eps"}  # eps: a benchmark's own radius (RealConfig.eps)
_DEFAULTS = {"layers": "last5", "token": "last"}
# Keys of every run that say where things are, not what was trained.
_NEUTRAL = {
    "model", "data", "max_steps", "epochs", "batch_size", "hidden_cache", "hidden_cache_dir",
}  # fmt: skip


def method_of(config: dict[str, Any], data: str | None) -> str | None:
    """The protocol method a training run belongs to, None for an ablation or a non-run."""
    for name, settings in METHODS.items():
        want = {k: v for k, v in {**_DEFAULTS, **settings}.items() if k not in _VARIED}
        same = all(config.get(k) == v for k, v in want.items())
        extra = set(config) - set(want) - _VARIED - _NEUTRAL
        if same and not extra and (data is None or config.get("data") == data):
            return name
    return None


def ablation_of(config: dict[str, Any], data: str | None) -> str | None:
    """What an ablation run of RoMA k-NN changes (``token=first``, ``data=train_10pct.jsonl``,
    ...), None for a run that is not one."""
    if config.get("objective") != METHODS["roma_knn"]["objective"]:
        return None
    want = {**_DEFAULTS, **METHODS["roma_knn"]}
    keys = sorted((set(config) | set(want)) - _VARIED - _NEUTRAL)
    changed = [f"{k}={_short(config.get(k))}" for k in keys if config.get(k) != want.get(k)]
    if data is not None and config.get("data") not in (None, data):
        changed.append(f"data={Path(str(config['data'])).name}")
    return ", ".join(changed) or None


def _short(value: Any) -> str:
    """A config value as the ablations table shows it: a path by its last part."""
    text = str(value)
    return Path(text).name if "/" in text else text


def _diagnostic(config: dict[str, Any], result: dict[str, Any] | None) -> str | None:
    """A line for a diagnostic's ledger record (the oracle, its control, RoMA's premise), None
    for any other record."""
    if result is None:
        return None
    if config.get("oracle"):
        found = OracleFound.model_validate(result)
        steps = ", ".join(f"{lr}: {pct(v)}" for lr, v in found.val_by_lr.items())
        return (
            f"- Oracle ({config.get('steps')} steps, step {found.lr:g} picked on val; val by "
            f"step {steps}): test {pct(found.test_before.average)} -> {pct(found.test.average)}"
        )
    if config.get("oracle_control"):
        control = OracleControl.model_validate(result)
        return (
            f"- Oracle control (toward a random wrong choice): its pick rate "
            f"{pct(control.before)} -> {pct(control.after)}"
        )
    if config.get("neighbour_routing"):
        found = NeighbourRouting.model_validate(result)
        return (
            f"- RoMA's premise (routing set to the mean of the {found.k} nearest successful "
            f"neighbours'): {pct(found.knn.average)}; {found.k} random successful samples': "
            f"{pct(found.random.average)}; its own: {pct(found.base.average)}"
        )
    return None


def pool_accuracy(run: RunRecord | None) -> str:
    """The training pool's accuracy before and after training: how well a run fits what it
    trains on, beside how it does on val and test."""
    metrics = run.train_metrics if run is not None else {}
    if "train_acc_before" not in metrics or "train_acc_after" not in metrics:
        return "-"
    return f"{pct(metrics['train_acc_before'])} -> {pct(metrics['train_acc_after'])}"


def progress(ledger_path: Path, data: str | None = None) -> str:
    """Markdown: the base scores (when the ledger has them), every method's grid and seeds,
    the paired differences to CE-only so far, and a count of the other records."""
    ledger = Ledger(ledger_path)
    runs: dict[str, list[RunRecord]] = defaultdict(list)
    base: dict[str, Accuracy] | None = None
    ablations: dict[str, list[RunRecord]] = defaultdict(list)
    others = 0
    diagnostics: list[str] = []
    for record in ledger.records.values():
        config = record["config"]
        if config.get("base_score"):
            base = {k: Accuracy.model_validate(v) for k, v in record["result"].items()}
            continue
        if line := _diagnostic(config, record.get("result")):
            diagnostics.append(line)
            continue
        method = method_of(config, data) if "patch" in record else None
        ablation = ablation_of(config, data) if "patch" in record and not method else None
        if ablation is not None:
            ablations[ablation].append(RunRecord.model_validate(record))
        elif method is None:
            others += 1
        else:
            runs[method].append(RunRecord.model_validate(record))
    lines = [f"# Progress of `{ledger_path}` ({len(ledger.records)} records)", ""]
    if base is not None:
        lines += [f"Base routers: val {pct(base['val'].average)}, "
                  f"test {pct(base['test'].average)} %.", ""]  # fmt: skip
    lines += [
        "| method | lr | lambda | seeds done | pool, seed 0 (base -> trained) | val, seed 0 "
        "| test, mean over seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    finals: dict[str, list[RunRecord]] = {}
    for method in METHODS:
        by_setting: dict[tuple[float | None, float, float | None], list[RunRecord]]
        by_setting = defaultdict(list)
        for run in runs.get(method, []):
            key = (run.config.get("eps"), run.config["lr"], run.config.get("lam"))
            by_setting[key].append(run)
        for (eps, lr, lam), found in sorted(
            by_setting.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1], kv[0][2] or 0)
        ):
            seed0 = next((r for r in found if r.seed == 0), None)
            tests = [r.test.average for r in found if r.test is not None]
            label = LABELS[method] + ("" if eps is None else f" (eps {eps:g})")
            lines.append(
                f"| {label} | {lr:g} | {'-' if lam is None else f'{lam:g}'} "
                f"| {','.join(str(r.seed) for r in sorted(found, key=lambda r: r.seed))} "
                f"| {pool_accuracy(seed0)} "
                f"| {pct(seed0.val.average) if seed0 else '-'} "
                f"| {pct(sum(tests) / len(tests)) if tests else '-'} |"
            )
        if by_setting:
            finals[method] = max(by_setting.values(), key=len)
    lines += ["", "Paired test difference to CE-only (seeds both have, 95 % interval), at each "
              "method's most-seeded setting:", ""]  # fmt: skip
    compared = [
        f"- {LABELS[m]}: {difference(diff)} over {len(f)} seeds"
        for m, f in finals.items()
        if m != "ce" and "ce" in finals and (diff := paired_difference(f, finals["ce"]))
    ]
    lines += compared or ["- none yet (needs two seeds of a method and of CE-only)"]
    if diagnostics:
        lines += ["", "Diagnostics (test split):", "", *diagnostics]
    if ablations:
        lines += ["", "RoMA k-NN ablations so far (what each changes from its protocol "
                  "setting):", "", "| change | lr | lambda | seeds done | test, mean over "
                  "seeds |", "|---|---|---|---|---|"]  # fmt: skip
        for change, found in sorted(ablations.items()):
            tests = [r.test.average for r in found if r.test is not None]
            settings = sorted({(r.config["lr"], r.config.get("lam")) for r in found})
            lr, lam = settings[0] if len(settings) == 1 else ("mixed", "mixed")
            lines.append(
                f"| {change} | {lr if isinstance(lr, str) else f'{lr:g}'} "
                f"| {lam if isinstance(lam, str) or lam is None else f'{lam:g}'} "
                f"| {','.join(str(r.seed) for r in sorted(found, key=lambda r: r.seed))} "
                f"| {pct(sum(tests) / len(tests)) if tests else '-'} |"
            )
    lines += ["", f"Other records (references, out-of-set scores): {others}."]
    return "\n".join(lines) + "\n"
