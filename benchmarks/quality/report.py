"""The pieces of a quality report: markdown tables of methods, bounds, hyper-parameters and
ablations, and the two PNG plots.

Plots: test accuracy of every method (mean over seeds, error bars = std over seeds, dashed lines
at base and oracle), and the routing distribution of one test task under the base routers and
under a RoMA patch (mean routing weight per expert at the routed token, one panel per tuned
layer), which shows what the patch changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from roma_bench.protocol import LABELS, METHODS
from roma_bench.results import (
    Accuracy,
    MethodStats,
    OracleControl,
    OracleFound,
    PairedDifference,
    Search,
    SeedStats,
    SharedRouting,
)

# The goal (the paper's OLMoE share of the base->oracle gap), drawn on the accuracy plot.
GOAL_SHARE = 0.64


def pct(x: float | None, missing: str = "n/a") -> str:
    """A fraction as a percentage with one decimal."""
    return missing if x is None else f"{100 * x:.1f}"


def difference(d: PairedDifference | None) -> str:
    if d is None:
        return "-"
    return f"{100 * d.mean:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"


class TaskTable:
    """A table with one column per task, then average, gap closed and the difference to CE."""

    def __init__(self, task_names: list[str]) -> None:
        self.task_names = task_names

    def header(self, first: str) -> list[str]:
        cells = [first, *self.task_names, "average", "gap closed", "vs CE"]
        return ["| " + " | ".join(cells) + " |", "|---" * len(cells) + "|"]

    def row(self, label: str, tasks: dict[str, float], avg: str, gap: str, vs: str = "-") -> str:
        cells = " | ".join(pct(tasks[t]) for t in self.task_names)
        return f"| {label} | {cells} | {avg} | {gap} | {vs} |"

    def bound(self, label: str, acc: Accuracy, gap: float | None) -> str:
        """A row for a single accuracy (no seeds): a bound or a diagnostic."""
        return self.row(label, acc.tasks, pct(acc.average), pct(gap))


def run_summary(results: Any, roles: str, n_tasks: int) -> str:
    """The line under a report's title: model, split sizes (``roles`` names them), budget, seeds
    and time taken; ``results`` is a benchmark's results model."""
    cfg = results.config
    return (
        f"Model `{Path(results.model).name}`; splits: {results.sizes} samples ({roles}), "
        f"{n_tasks} tasks; success set |S| = {results.success_set}; {cfg.steps} steps of batch "
        f"{cfg.batch_size} per run; seeds {cfg.seeds}. This invocation took "
        f"{results.seconds:.0f} s (runs already in runs.jsonl are reused, not retrained)."
    )


TEST_HEADING = [
    "## Test accuracy (%), mean over seeds (± std); gap = share of base->oracle gap closed",
    "",
    "vs CE: the difference to CE-only in points, paired by seed (same batches), with its "
    "95 % Student-t interval over the seeds; an interval that contains 0 is no evidence "
    "of a difference.",
    "",
]


def methods_table(
    table: TaskTable, base: Accuracy, oracle: Accuracy, methods: dict[str, MethodStats]
) -> list[str]:
    """Test accuracy of the base, every method (mean ± std over seeds) and the oracle."""
    lines = [*table.header("method"), table.row(LABELS["base"], base.tasks, pct(base.average), "0")]
    for m in METHODS:
        s = methods[m]
        lines.append(
            table.row(
                LABELS[m],
                s.tasks_mean,
                f"{pct(s.test_mean)} ± {pct(s.test_std)}",
                pct(s.gap_closed),
                difference(s.vs_ce),
            )
        )
    lines.append(table.row(LABELS["oracle"], oracle.tasks, pct(oracle.average), "100"))
    return lines


def oracle_control_note(control: OracleControl, oracle: OracleFound) -> list[str]:
    return [
        "",
        f"Oracle control: the same optimisation toward a random *wrong* choice of every test "
        f"sample raises that choice's pick rate from {pct(control.before)} to "
        f"{pct(control.after)} % ({100 * (control.after - control.before):+.1f} "
        f"points; the oracle: gold {pct(oracle.test_before.average)} -> "
        f"{pct(oracle.test.average)} %). How far routing one token can steer the "
        "answer, whatever the answer.",
    ]


def bounds_table(
    table: TaskTable, domain: Accuracy, domain_gap: float | None, shared: SharedRouting
) -> list[str]:
    """The two diagnostic bounds that use the labels: domain routing and task-shared routing."""
    return [
        "",
        "Diagnostic, not a method (it uses the task label): routing each test sample at the "
        "tuned layers' last prompt token like the mean of its task's success-set samples "
        "gives the row below, i.e. how much of the gap is the kind of correction that "
        "aligning with successful neighbours can teach.",
        "",
        *table.header("diagnostic"),
        table.bound("Domain routing", domain, domain_gap),
        table.bound(
            f"Best task-shared routing (step {shared.lr:g})", shared.test, shared.gap_closed
        ),
        "",
        "Best task-shared routing: one routing per task and tuned layer, optimised on "
        "the gold answers of all the task's test samples (from the domain routing "
        "above), every sample of the task routed with it. What routing each sample like "
        "the other samples of its task could give at most; the oracle adapts the routing "
        "to each sample.",
    ]


def hyperparameters_table(
    search: dict[str, Search],
    methods: dict[str, MethodStats],
    oracle: OracleFound,
    oracle_steps: int,
    base: dict[str, Accuracy],
) -> list[str]:
    """What validation picked for every method and the oracle, with the base accuracies."""
    lines = ["", "## Chosen hyper-parameters (picked on validation with seed 0)", ""]
    lines += [
        "| method | lr | lambda | val acc (%, mean of seeds) | train acc after (%) "
        "| pool with neighbours (%) |",
        "|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        best, s = search[m].best, methods[m]
        covered = s.with_neighbours
        lines.append(
            f"| {LABELS[m]} | {best.lr:g} | {best.lam if best.lam is not None else '-'} "
            f"| {pct(s.val_mean)} | {pct(s.train_acc_after)} "
            f"| {'-' if covered is None else pct(covered)} |"
        )
    lines.append(
        f"| {LABELS['oracle']} | {oracle.lr:g} (Adam on logits, {oracle_steps} steps) "
        f"| - | {pct(max(oracle.val_by_lr.values()))} | - | - |"
    )
    lines.append(
        f"\nBase: val {pct(base['val'].average)}, test {pct(base['test'].average)}; oracle test "
        f"{pct(oracle.test.average)}. Validation picks every setting; the test split "
        "only reports."
    )
    return lines


def ablations_section(ablations: dict[str, dict[str, SeedStats]]) -> list[str]:
    lines = ["", "## Ablations (RoMA k-NN, test accuracy %, mean ± std over seeds)", ""]
    for factor, options in ablations.items():
        lines += [f"**{factor}**", "", "| setting | test acc | gap closed |", "|---|---|---|"]
        for name, s in options.items():
            lines.append(
                f"| {name} | {pct(s.test_mean)} ± {pct(s.test_std)} | {pct(s.gap_closed)} |"
            )
        lines.append("")
    return lines


def accuracy_plot(
    methods: dict[str, MethodStats],
    base: float,
    oracle: float,
    shared: float,
    title: str,
    path: Path,
) -> None:
    """Every method's test accuracy against the base, the oracle, the goal and the best
    task-shared routing (the most that routing a task's samples alike gives, answers in hand)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(METHODS)
    means = [100 * methods[m].test_mean for m in names]
    stds = [100 * methods[m].test_std for m in names]
    fig, ax = plt.subplots(figsize=(9, 4))
    colors = ["tab:gray"] * 5 + ["tab:blue", "tab:blue"]
    colors[4] = "tab:olive"
    ax.bar([LABELS[m] for m in names], means, yerr=stds, capsize=4, color=colors)
    ax.axhline(100 * base, ls="--", color="k", label="base")
    ax.axhline(100 * oracle, ls=":", color="tab:red", label="oracle")
    goal = 100 * (base + GOAL_SHARE * (oracle - base))
    ax.axhline(goal, ls=":", color="tab:gray", label=f"{100 * GOAL_SHARE:.0f} % of gap")
    ax.axhline(
        100 * shared, ls="-.", color="tab:purple", label="best task-shared routing (diagnostic)"
    )
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(max(0, min([*means, 100 * base]) - 10), 100)
    ax.legend(loc="upper left")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def routing_plot(before: Any, after: Any, layers: list[int], task: str, path: Path) -> None:
    """``before``/``after``: [n_samples, n_layers, n_experts] routing weights of one task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(layers)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3), sharey=True)
    axes = [axes] if n == 1 else axes
    experts = range(before.shape[-1])
    for ax, slot, layer in zip(axes, range(n), layers, strict=True):
        ax.bar([e - 0.2 for e in experts], before[:, slot].mean(0), width=0.4, label="base")
        ax.bar([e + 0.2 for e in experts], after[:, slot].mean(0), width=0.4, label="RoMA patch")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("expert")
    axes[0].set_ylabel("mean routing weight")
    axes[0].legend()
    fig.suptitle(f"Routing at the last prompt token, test task '{task}'")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
