"""The quality benchmark on real tasks: the protocol (``roma_bench.protocol``) on capped OLMES
splits (``splits.py``) and any Qwen2-MoE/OLMoE checkpoint, plus what a real model allows: the
all-experts and dense references, the patches on tasks no method trained on, and the issue's
goals checked against the measured numbers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from roma_bench.protocol import HEADLINE, METHODS, Protocol, QualityConfig
from roma_bench.real.references import all_experts_dir, load_reference
from roma_bench.real.report import PLOT_TITLE, RIVALS, goals, markdown
from roma_bench.real.results import OutOfSet, RealResults, References
from roma_bench.real.splits import OUT_OF_SET, TASKS, write_out_of_set, write_splits
from roma_bench.report import accuracy_plot
from roma_bench.results import Accuracy, RunRecord, Search, SharedRouting
from roma_bench.runs import accuracies, patch_file
from roma_bench.stats import ablation_stats, gap_closed, paired_difference, seed_stats, summarise
from roma_trainer.data import data_fingerprint

# The patches scored on the out-of-set tasks (with the base routers).
OUT_OF_SET_METHODS: tuple[str, ...] = ("ce", "roma_knn")
SMALL_TASKS: tuple[str, ...] = ("copa", "sciq", "arc_easy")
# What ``--only`` calls RoMA k-NN's ablations, beside the method names.
ABLATIONS = "ablations"


@dataclass
class RealConfig(QualityConfig):
    """The protocol's settings with caps per task sized for a 135M model on two cores: one run
    (success set, training, scoring val and test) takes minutes (docs/real-quality.md)."""

    model: str | None = None  # required: the MoE checkpoint directory
    out: Path = Path("results/real")
    n_train: int = 100  # pool per task
    n_val: int = 30
    n_test: int = 60
    steps: int = 60
    shared_steps: int = 10  # the task-shared oracle: 30 steps would take hours on 2 cores
    tasks: tuple[str, ...] = TASKS
    out_of_set: tuple[str, ...] = OUT_OF_SET
    n_out_of_set: int = 60  # per out-of-set task
    dense: str | None = None  # the dense model the MoE was made from, if any
    # The MoEfied model's routers are small (|W| ~ 1e-3, inputs |h|_1 ~ 70-100, logits ~ 0.01)
    # and its routing weights near 1/16 (every expert scaled by 16 keeps all-experts = dense):
    # Adam moves every logit by ~70 x lr a step, and ||r_i - r_j||^2 between pool samples is
    # ~1e-6 (docs/real-quality.md "Scales"). The grids are the synthetic benchmark's, moved to
    # where the step and the regularisers are comparable to the CE on this model.
    lr_grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3)
    # RoMA eps-ball's radius (d = sqrt(2 - 2 cos) in MiniLM space). The paper's 0.5 (the
    # synthetic benchmark's, in METHODS) gives no pool sample a neighbour here: prompts of six
    # tasks lie far apart in MiniLM space (median distance to the nearest pool sample 1.02).
    # At 1.1 a sample has 5.2 pool samples within reach on average, about 3 of them
    # successful, as k-NN's k = 3 (docs/real-quality.md, "Methods, budget, search").
    eps: float = 1.1
    lam_grid: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: (
            QualityConfig().lam_grid | {"entropy": (1e4, 1e5, 1e6), "manifold": (1e4, 1e5, 1e6)}
        )
    )

    @classmethod
    def small(cls, out: Path = Path("results/real-small")) -> RealConfig:
        """A few minutes on a tiny model: the three tasks with the shortest prompts, a handful
        of samples each, the protocol's small grids and seeds, short batches (a tiny model's
        byte-level tokenizer makes real prompts hundreds of tokens long)."""
        small = super().small(out)
        return replace(
            small,
            tasks=SMALL_TASKS,
            n_train=8,
            n_val=3,
            n_test=4,
            n_out_of_set=3,
            steps=3,
            batch_size=4,
        )


class Real(Protocol):
    """The protocol on the real splits (written into ``cfg.out``/data)."""

    def __init__(self, cfg: RealConfig) -> None:
        if cfg.model is None:
            raise ValueError(
                "the real benchmark needs --model (build one with `roma-models build smollm2-moe`)"
            )
        data = Path(cfg.out) / "data"
        caps = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
        paths = write_splits(data, cfg.tasks, caps, cfg.data_seed)
        paths["out_of_set"] = write_out_of_set(
            data, cfg.out_of_set, cfg.n_out_of_set, cfg.data_seed
        )
        # Hidden states below the tuned layers, computed once and kept on disk for the scorer
        # and for every run's training (docs/real-quality.md "Cost").
        self.hidden_dir = Path(cfg.out) / "hidden"
        super().__init__(cfg, str(cfg.model), paths, hidden_dir=self.hidden_dir)
        self.cfg: RealConfig = cfg

    def train_config(self, method: str, **overrides: object) -> dict[str, object]:
        config = super().train_config(method, **overrides) | {
            "hidden_cache": "disk",
            "hidden_cache_dir": str(self.hidden_dir),
        }
        if config.get("neighbours") == "eps" and "eps" not in overrides:
            config["eps"] = self.cfg.eps
        return config

    def references(self) -> References:
        """The MoE with every expert on and the dense model, on the test split; cached."""
        test = {"test": self.samples["test"]}

        def score(path: Path) -> Accuracy:
            model, tokenizer, _ = load_reference(path)
            return accuracies(model, tokenizer, test)["test"]

        every = self.out / "models" / "all-experts"
        all_experts = self.cached(
            {"reference": "all_experts"},
            Accuracy,
            lambda: score(all_experts_dir(Path(self.model), every)),
        )
        dense = None
        if self.cfg.dense is not None:
            model, tokenizer, weights = load_reference(Path(self.cfg.dense))
            dense = self.cached(
                {"reference": "dense", "weights": weights},
                Accuracy,
                lambda: accuracies(model, tokenizer, test)["test"],
            )
        return References(all_experts=all_experts, dense=dense)

    def out_of_set(self, finals: dict[str, list[RunRecord]]) -> OutOfSet:
        """The base routers and the final CE and RoMA patches (every seed) on the out-of-set
        tasks; each score cached."""
        samples = self.samples["out_of_set"]
        data = data_fingerprint(samples)

        def score(run: RunRecord | None) -> Accuracy:
            return self.cached(
                {"out_of_set_score": run and run.patch, "data": data},
                Accuracy,
                lambda: self.scorer.score(run and patch_file(run), {"o": samples})["o"],
            )

        base = score(None)
        runs = {
            m: [r.model_copy(update={"test": score(r)}) for r in finals[m]]
            for m in OUT_OF_SET_METHODS
        }
        sizes: dict[str, int] = {}
        for s in samples:
            sizes[s.task] = sizes.get(s.task, 0) + 1
        return OutOfSet(
            sizes=sizes,
            base=base,
            methods={m: seed_stats(r, base, base) for m, r in runs.items()},
            vs_ce={m: paired_difference(r, runs["ce"]) for m, r in runs.items() if m != "ce"},
        )

    def run_all(self) -> RealResults:
        started = time.perf_counter()
        base = self.base_scores()
        # On two cores the whole benchmark takes days and every step is in the ledger as soon
        # as it ends, so the order decides what is known first: the headline comparison (CE and
        # RoMA k-NN), then the oracle (how much of the base's errors routing can fix at all:
        # the bound every method is measured against) and the test of RoMA's premise (do the
        # neighbours' routings answer better), then the other methods.
        self.searches_and_finals(HEADLINE)
        oracle = self.oracle()
        oracle_control = self.oracle_control(oracle.lr)
        neighbour_routing = self.neighbour_routing()
        searches, finals = self.searches_and_finals()
        shared = self.shared_routing()
        references = self.references()
        ablations = self.ablations(searches["roma_knn"].best) if self.cfg.ablations else {}
        methods = summarise(finals, base["test"], oracle.test)
        return RealResults(
            config=self.cfg,
            model=self.model,
            sizes={s: len(v) for s, v in self.samples.items()},
            base=base,
            oracle=oracle,
            oracle_control=oracle_control,
            neighbour_routing=neighbour_routing,
            shared_routing=SharedRouting(
                **dict(shared),
                gap_closed=gap_closed(
                    shared.test.average, base["test"].average, oracle.test.average
                ),
            ),
            references=references,
            search=searches,
            methods=methods,
            ablations=ablation_stats(ablations, base["test"], oracle.test),
            out_of_set=self.out_of_set(finals),
            goals=goals(
                methods,
                {r: paired_difference(finals["roma_knn"], finals[r]) for r in RIVALS},
            ),
            success_set=finals["roma_knn"][0].train_metrics.get("success_set_size"),
            seconds=round(time.perf_counter() - started, 1),
        )


def run_methods(cfg: RealConfig, methods: tuple[str, ...]) -> dict[str, Search]:
    """Only ``methods``' searches and their winners' seeds, into the ledger, and with
    ``"ablations"`` among them RoMA k-NN's ablations (after its search, run here if the ledger
    lacks it): a helper worker beside a full run on the same ``cfg.out`` (another core or
    machine sharing the folder), which finds these runs there when it reaches them. Writes no
    report."""
    unknown = sorted(set(methods) - set(METHODS) - {ABLATIONS})
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join([*METHODS, ABLATIONS])}")
    real = Real(cfg)
    searches, _ = real.searches_and_finals(tuple(m for m in methods if m != ABLATIONS))
    if ABLATIONS in methods:
        knn = searches.get("roma_knn") or real.search("roma_knn")
        real.ablations(knn.best)
        searches.setdefault("roma_knn", knn)
    return searches


def run_real(cfg: RealConfig) -> RealResults:
    """Everything: the runs, then real.json, real.md and real_accuracy.png in ``cfg.out``."""
    results = Real(cfg).run_all()
    out = Path(cfg.out)
    if cfg.plots:
        accuracy_plot(
            results.methods,
            results.base["test"].average,
            results.oracle.test.average,
            results.shared_routing.test.average,
            PLOT_TITLE,
            out / "real_accuracy.png",
        )
    (out / "real.json").write_text(results.to_json())
    (out / "real.md").write_text(markdown(results))
    return results
