"""Render the quality results: ``quality.md`` (tables), and the two PNG plots.

Plots: test accuracy of every method (mean over seeds, error bars = std over seeds, dashed lines
at base and oracle), and the routing distribution of one test task under the base routers and
under a RoMA patch (mean routing weight per expert at the routed token, one panel per tuned
layer), which shows what the patch changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from roma_trainer.bench.quality import LABELS, METHODS, gap_closed


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _difference(d: dict[str, float] | None) -> str:
    if d is None:
        return "-"
    return f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def markdown(results: dict[str, Any]) -> str:
    base, oracle, methods = results["base"], results["oracle"], results["methods"]
    task_names = list(base["test"]["tasks"])
    cfg = results["config"]

    def header(first: str) -> list[str]:
        cells = [first, *task_names, "average", "gap closed", "vs CE"]
        return ["| " + " | ".join(cells) + " |", "|---" * len(cells) + "|"]

    lines = [
        "# Routing-gap benchmark",
        "",
        f"Model `{Path(results['model']).name}`; splits: {results['sizes']} samples "
        f"(train pool / val / test), {len(task_names)} tasks; "
        f"success set |S| = {results['success_set']}; {cfg['steps']} steps of batch "
        f"{cfg['batch_size']} per run; seeds {cfg['seeds']}. This invocation took "
        f"{results['seconds']:.0f} s (runs already in runs.jsonl are reused, not retrained).",
        "",
        "## Test accuracy (%), mean over seeds (± std); gap = share of base->oracle gap closed",
        "",
        "vs CE: the difference to CE-only in points, paired by seed (same batches), with its "
        "95 % Student-t interval over the seeds; an interval that contains 0 is no evidence "
        "of a difference.",
        "",
        *header("method"),
    ]
    row = lambda label, tasks, avg, gap, vs="-": (  # noqa: E731
        f"| {label} | "
        + " | ".join(_pct(tasks[t]) for t in task_names)
        + f" | {avg} | {gap} | {vs} |"
    )
    lines.append(row(LABELS["base"], base["test"]["tasks"], _pct(base["test"]["average"]), "0"))
    for m in METHODS:
        s = methods[m]
        lines.append(
            row(
                LABELS[m],
                s["tasks_mean"],
                f"{_pct(s['test_mean'])} ± {_pct(s['test_std'])}",
                _pct(s["gap_closed"]),
                _difference(s.get("vs_ce")),
            )
        )
    lines.append(
        row(LABELS["oracle"], oracle["test"]["tasks"], _pct(oracle["test"]["average"]), "100")
    )
    control = results.get("oracle_control")
    if control:
        lines += [
            "",
            f"Oracle control: the same optimisation toward a random *wrong* choice of every test "
            f"sample raises that choice's pick rate from {_pct(control['before'])} to "
            f"{_pct(control['after'])} % ({100 * (control['after'] - control['before']):+.1f} "
            f"points; the oracle: gold {_pct(oracle['test_before']['average'])} -> "
            f"{_pct(oracle['test']['average'])} %). How far routing one token can steer the "
            "answer, whatever the answer.",
        ]
    domain = results.get("domain_routing")
    if domain:
        lines += [
            "",
            "Diagnostic, not a method (it uses the task label): routing each test sample at the "
            "tuned layers' last prompt token like the mean of its task's success-set samples "
            "gives the row below, i.e. how much of the gap is the kind of correction that "
            "aligning with successful neighbours can teach.",
            "",
            *header("diagnostic"),
            row(
                "Domain routing",
                domain["test"]["tasks"],
                _pct(domain["test"]["average"]),
                _pct(domain["gap_closed"]),
            ),
        ]
        shared = results.get("shared_routing")
        if shared:
            lines.append(
                row(
                    f"Best task-shared routing (step {shared['lr']:g})",
                    shared["test"]["tasks"],
                    _pct(shared["test"]["average"]),
                    _pct(shared["gap_closed"]),
                )
            )
            lines += [
                "",
                "Best task-shared routing: one routing per task and tuned layer, optimised on "
                "the gold answers of all the task's test samples (from the domain routing "
                "above), every sample of the task routed with it. What routing each sample like "
                "the other samples of its task could give at most; the oracle adapts the routing "
                "to each sample.",
            ]
    frames = (domain or {}).get("test", {}).get("frames")
    if frames:
        lines += [
            "",
            "Per held-out test phrasing: base accuracy and accuracy with domain routing (%), "
            "i.e. which phrasings routing at the last prompt token can fix.",
            "",
            "| task | phrasing | n | base | domain routing |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {f['task']} | {f['frame']} | {f['n']} | {_pct(f['base'])} "
            f"| {_pct(f['domain_routing'])} |"
            for f in frames
        ]
    lines += ["", "## Chosen hyper-parameters (picked on validation with seed 0)", ""]
    lines += [
        "| method | lr | lambda | val acc (%, mean of seeds) | train acc after (%) "
        "| pool with neighbours (%) |",
        "|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        best, s = results["search"][m]["best"], methods[m]
        covered = s.get("with_neighbours")
        lines.append(
            f"| {LABELS[m]} | {best['lr']:g} | {best['lam'] if best['lam'] is not None else '-'} "
            f"| {_pct(s['val_mean'])} | {_pct(s['train_acc_after'])} "
            f"| {'-' if covered is None else _pct(covered)} |"
        )
    lines.append(
        f"| {LABELS['oracle']} | {oracle['lr']:g} (Adam on logits, {cfg['oracle_steps']} steps) "
        f"| - | {_pct(max(oracle['val_by_lr'].values()))} | - | - |"
    )
    lines.append(
        f"\nBase: val {_pct(results['base']['val']['average'])}, "
        f"test {_pct(results['base']['test']['average'])}; oracle test "
        f"{_pct(oracle['test']['average'])}. Validation picks every setting; the test split "
        "only reports."
    )
    iid = results.get("in_distribution")
    if iid:
        lines += [
            "",
            "## In-distribution check: fresh instances of the pool's own phrasings (%)",
            "",
            f"Pretraining phrasings ({iid['sizes']['pretrain']} samples) and adaptation "
            f"phrasings ({iid['sizes']['adapt']}), prompts not in the pool; final patches, "
            "mean ± std over seeds.",
            "",
            "| method | pretraining phrasings | gap closed | adaptation phrasings | gap closed |",
            "|---|---|---|---|---|",
            f"| {LABELS['base']} | {_pct(iid['base']['pretrain'])} | 0 "
            f"| {_pct(iid['base']['adapt'])} | 0 |",
        ]
        for m in METHODS:
            cells = [
                f"{_pct(iid[m][g]['mean'])} ± {_pct(iid[m][g]['std'])} "
                f"| {_pct(iid[m][g].get('gap_closed'))}"
                for g in ("pretrain", "adapt")
            ]
            lines.append(f"| {LABELS[m]} | {cells[0]} | {cells[1]} |")
        if "oracle" in iid:
            lines.append(
                f"| {LABELS['oracle']} (step {oracle['lr']:g}) | {_pct(iid['oracle']['pretrain'])} "
                f"| 100 | {_pct(iid['oracle']['adapt'])} | 100 |"
            )
            dr = iid["domain_routing"]
            gaps = {
                g: _pct(gap_closed(dr[g], iid["base"][g], iid["oracle"][g]))
                for g in ("pretrain", "adapt")
            }
            lines.append(
                f"| Domain routing (diagnostic) | {_pct(dr['pretrain'])} | {gaps['pretrain']} "
                f"| {_pct(dr['adapt'])} | {gaps['adapt']} |"
            )
    dm = results.get("domain_mass")
    if dm:
        lines += [
            "",
            "## Routing weight on the sample's own domain experts (test split)",
            "",
            "At the last prompt token, mean over the tuned layers: the experts pretraining gave "
            "the sample's domain. Above base = the patch moved routing toward them.",
            "",
            "| method | weight on own domain's experts |",
            "|---|---|",
            f"| {LABELS['base']} | {dm['base']:.3f} |",
        ]
        for m in METHODS:
            lines.append(f"| {LABELS[m]} | {dm[m]['mean']:.3f} ± {dm[m]['std']:.3f} |")
    if results["ablations"]:
        lines += ["", "## Ablations (RoMA k-NN, test accuracy %, mean ± std over seeds)", ""]
        for factor, options in results["ablations"].items():
            lines += [f"**{factor}**", "", "| setting | test acc | gap closed |", "|---|---|---|"]
            for name, s in options.items():
                lines.append(
                    f"| {name} | {_pct(s['test_mean'])} ± {_pct(s['test_std'])} "
                    f"| {_pct(s['gap_closed'])} |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


def accuracy_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(METHODS)
    means = [100 * results["methods"][m]["test_mean"] for m in names]
    stds = [100 * results["methods"][m]["test_std"] for m in names]
    fig, ax = plt.subplots(figsize=(9, 4))
    colors = ["tab:gray"] * 5 + ["tab:blue", "tab:blue"]
    colors[4] = "tab:olive"
    ax.bar([LABELS[m] for m in names], means, yerr=stds, capsize=4, color=colors)
    ax.axhline(100 * results["base"]["test"]["average"], ls="--", color="k", label="base")
    ax.axhline(100 * results["oracle"]["test"]["average"], ls=":", color="tab:red", label="oracle")
    base, oracle = results["base"]["test"]["average"], results["oracle"]["test"]["average"]
    # The goal (the paper's OLMoE share): 64 % of the base->oracle gap.
    ax.axhline(100 * (base + 0.64 * (oracle - base)), ls=":", color="tab:gray", label="64 % of gap")
    shared = results.get("shared_routing")
    if shared:  # the most that routing a task's samples alike gives, answers in hand
        ax.axhline(
            100 * shared["test"]["average"],
            ls="-.",
            color="tab:purple",
            label="best task-shared routing (diagnostic)",
        )
    ax.set_ylabel("test accuracy (%)")
    low = min([*means, 100 * results["base"]["test"]["average"]]) - 10
    ax.set_ylim(max(0, low), 100)
    ax.legend(loc="upper left")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    ax.set_title("Routing-gap benchmark: held-out phrasings (mean ± std over seeds)")
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
