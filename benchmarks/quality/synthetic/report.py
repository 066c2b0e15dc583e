"""``quality.md`` of the routing-gap benchmark: the protocol's tables (``roma_bench.report``)
with the synthetic diagnostics between them."""

from __future__ import annotations

from roma_bench.protocol import LABELS, METHODS
from roma_bench.report import (
    TEST_HEADING,
    TaskTable,
    ablations_section,
    bounds_table,
    hyperparameters_table,
    methods_table,
    oracle_control_note,
    pct,
    run_summary,
)
from roma_bench.stats import gap_closed
from roma_bench.synthetic.results import DomainMass, FrameRow, InDistribution, QualityResults

PLOT_TITLE = "Routing-gap benchmark: held-out phrasings (mean ± std over seeds)"


def markdown(results: QualityResults) -> str:
    base, oracle, cfg = results.base, results.oracle, results.config
    table = TaskTable(list(base["test"].tasks))
    lines = [
        "# Routing-gap benchmark",
        "",
        run_summary(results, "train pool / val / test", len(table.task_names)),
        "",
        *TEST_HEADING,
        *methods_table(table, base["test"], oracle.test, results.methods),
        *oracle_control_note(results.oracle_control, oracle),
        *bounds_table(
            table,
            results.domain_routing.test,
            results.domain_routing.gap_closed,
            results.shared_routing,
        ),
        *frames_table(results.domain_routing.test.frames),
        *hyperparameters_table(results.search, results.methods, oracle, cfg.oracle_steps, base),
        *in_distribution_table(results.in_distribution, oracle.lr),
        *domain_mass_table(results.domain_mass),
    ]
    if results.ablations:
        lines += ablations_section(results.ablations)
    return "\n".join(lines) + "\n"


def frames_table(frames: list[FrameRow]) -> list[str]:
    return [
        "",
        "Per held-out test phrasing: base accuracy and accuracy with domain routing (%), "
        "i.e. which phrasings routing at the last prompt token can fix.",
        "",
        "| task | phrasing | n | base | domain routing |",
        "|---|---|---|---|---|",
        *(
            f"| {f.task} | {f.frame} | {f.n} | {pct(f.base)} | {pct(f.domain_routing)} |"
            for f in frames
        ),
    ]


def in_distribution_table(iid: InDistribution, oracle_lr: float) -> list[str]:
    groups = ("pretrain", "adapt")
    lines = [
        "",
        "## In-distribution check: fresh instances of the pool's own phrasings (%)",
        "",
        f"Pretraining phrasings ({iid.sizes['pretrain']} samples) and adaptation "
        f"phrasings ({iid.sizes['adapt']}), prompts not in the pool; final patches, "
        "mean ± std over seeds.",
        "",
        "| method | pretraining phrasings | gap closed | adaptation phrasings | gap closed |",
        "|---|---|---|---|---|",
        f"| {LABELS['base']} | {pct(iid.base['pretrain'])} | 0 | {pct(iid.base['adapt'])} | 0 |",
    ]
    for m in METHODS:
        cells = [
            f"{pct(s.mean)} ± {pct(s.std)} | {pct(s.gap_closed)}"
            for s in (iid.methods[m][g] for g in groups)
        ]
        lines.append(f"| {LABELS[m]} | {cells[0]} | {cells[1]} |")
    lines.append(
        f"| {LABELS['oracle']} (step {oracle_lr:g}) | {pct(iid.oracle['pretrain'])} "
        f"| 100 | {pct(iid.oracle['adapt'])} | 100 |"
    )
    dr = iid.domain_routing
    gaps = {g: pct(gap_closed(dr[g], iid.base[g], iid.oracle[g])) for g in groups}
    lines.append(
        f"| Domain routing (diagnostic) | {pct(dr['pretrain'])} | {gaps['pretrain']} "
        f"| {pct(dr['adapt'])} | {gaps['adapt']} |"
    )
    return lines


def domain_mass_table(dm: DomainMass) -> list[str]:
    return [
        "",
        "## Routing weight on the sample's own domain experts (test split)",
        "",
        "At the last prompt token, mean over the tuned layers: the experts pretraining gave "
        "the sample's domain. Above base = the patch moved routing toward them.",
        "",
        "| method | weight on own domain's experts |",
        "|---|---|",
        f"| {LABELS['base']} | {dm.base:.3f} |",
        *(f"| {LABELS[m]} | {dm.methods[m].mean:.3f} ± {dm.methods[m].std:.3f} |" for m in METHODS),
    ]
