"""The routing-gap benchmark: the protocol (``roma_bench.protocol``) on the synthetic tasks
(``tasks.py``) and the benchmark model pretrained on them (``pretrain.py``).

Data: a training pool (pretraining + adaptation phrasings), a validation split and a test split,
each with its own held-out phrasings. Besides the protocol's oracle and bounds, three diagnostics
that only this setting allows, because every prompt's phrasing and every domain's experts are
known: domain routing per held-out phrasing, the final patches on fresh prompts in the pool's own
phrasings (in distribution), and the routing weight each test sample puts on its domain's
experts.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from statistics import mean, pstdev

import numpy as np

from roma_bench.oracle import base_correct, run_oracle
from roma_bench.protocol import Protocol, QualityConfig
from roma_bench.report import accuracy_plot, routing_plot
from roma_bench.results import Accuracy, RunRecord, SharedRouting
from roma_bench.runs import Scorer
from roma_bench.stats import ablation_stats, accuracy_by_task, gap_closed, summarise
from roma_bench.synthetic import tasks
from roma_bench.synthetic.pretrain import domain_experts
from roma_bench.synthetic.report import PLOT_TITLE, markdown
from roma_bench.synthetic.results import (
    DomainMass,
    DomainRouting,
    DomainRoutingFound,
    FramedAccuracy,
    FrameRow,
    InDistribution,
    InDistributionBounds,
    MeanStd,
    MeanStdGap,
    QualityResults,
)
from roma_models import bench_model_dir
from roma_trainer.data import Sample, data_fingerprint, parse_sample

log = logging.getLogger("roma_bench")


class Quality(Protocol):
    """The protocol on the synthetic splits (written into ``cfg.out``/data), plus diagnostics."""

    def __init__(self, cfg: QualityConfig, scored: tuple[str, ...] = ("val", "test")) -> None:
        paths = tasks.write_splits(
            Path(cfg.out) / "data", cfg.data_seed, cfg.n_train, cfg.n_val, cfg.n_test
        )
        super().__init__(cfg, str(cfg.model or bench_model_dir()), dict(paths), scored)

    def domain_routing(self) -> DomainRoutingFound:
        """Diagnostic bound (uses the task label, so not a method): every val/test sample's
        routing at the tuned layers' last prompt token set to the mean base routing of its
        task's success-set members, overall and per held-out phrasing. How much of the oracle's
        gap is "route like the samples of this task that work", the kind of correction RoMA's
        neighbours can teach; cached."""
        key = {
            "domain_routing": True,
            "by_frame": True,
            **{s: str(p) for s, p in self.paths.items()},
        }

        def compute() -> DomainRoutingFound:
            model, tok, _ = self.base_model()
            found = {}
            for split in ("val", "test"):
                samples = self.samples[split]
                correct = self.transplant(samples)
                found[split] = FramedAccuracy(
                    **dict(accuracy_by_task(samples, correct)),
                    frames=by_frame(samples, base_correct(model, tok, samples), correct),
                )
            result = DomainRoutingFound(**found)
            log.info("domain-routing bound: test accuracy %.3f", result.test.average)
            return result

        return self.cached(key, DomainRoutingFound, compute)

    def domain_mass(self, finals: dict[str, list[RunRecord]]) -> DomainMass:
        """Diagnostic: the routing weight each test sample puts on its own domain's experts (the
        ones pretraining gave that domain, ``pretrain.domain_experts``) at the last prompt token,
        mean over the tuned layers, under the base routers and under every final patch. Says
        whether a method moved routing toward the experts that hold the skill or away."""
        samples = self.samples["test"]
        names = list(tasks.TASKS)

        def mass(patch: str | None) -> float:
            def compute() -> float:
                routing, _ = self.scorer.routing(samples, patch)
                groups = [
                    domain_experts(names.index(s.task), len(names), routing.shape[-1])
                    for s in samples
                ]
                # routing[i][:, g], not routing[i, :, g]: numpy would put the expert axis first.
                return float(
                    np.mean([routing[i][:, g].sum(-1).mean() for i, g in enumerate(groups)])
                )

            return self.cached({"domain_mass": patch}, float, compute)

        methods = {}
        for method, runs in finals.items():
            values = [mass(r.patch) for r in runs]
            methods[method] = MeanStd(mean=mean(values), std=pstdev(values))
        return DomainMass(base=mass(None), methods=methods)

    def in_distribution(
        self, finals: dict[str, list[RunRecord]], oracle_lr: float
    ) -> InDistribution:
        """Diagnostic: the final patches on fresh instances of the pool's own phrasings
        (pretraining and adaptation frames, prompts not in the pool), with the oracle and the
        domain-routing diagnostic there. Tells "the routers learnt nothing" apart from "what
        they learnt does not transfer to held-out phrasings"."""
        pool = {s.prompt for s in self.samples["train"]}
        splits = {}
        for group in ("pretrain", "adapt"):
            rows = tasks.generate("train", self.cfg.n_val, self.cfg.data_seed + 1, (group,))
            splits[group] = [
                parse_sample(r, f"in-distribution {group} sample")
                for r in rows
                if r["prompt"] not in pool
            ]
        scorer = Scorer(self.model, splits)
        base = {g: v.average for g, v in scorer.score(None).items()}
        data = data_fingerprint([s for v in splits.values() for s in v])
        bounds = self.in_distribution_bounds(splits, data, oracle_lr)
        methods = {}
        for method, runs in finals.items():
            scores = [
                self.cached(
                    {"in_distribution_score": r.patch, "data": data},
                    dict[str, Accuracy],
                    lambda patch=r.patch: scorer.score(patch),
                )
                for r in runs
            ]
            methods[method] = {}
            for g in splits:
                accs = [s[g].average for s in scores]
                methods[method][g] = MeanStdGap(
                    mean=mean(accs),
                    std=pstdev(accs),
                    gap_closed=gap_closed(mean(accs), base[g], bounds.oracle[g]),
                )
        return InDistribution(
            sizes={g: len(v) for g, v in splits.items()},
            base=base,
            oracle=bounds.oracle,
            domain_routing=bounds.domain_routing,
            methods=methods,
        )

    def in_distribution_bounds(
        self, splits: dict[str, list[Sample]], data: str, oracle_lr: float
    ) -> InDistributionBounds:
        """The oracle (the step size validation picked) and the domain-routing diagnostic on
        the in-distribution sets, so that a method's share of the gap can be read where test
        and pool phrasings agree, the setting of the paper's benchmarks; cached."""
        key = {
            "in_distribution_bounds": True,
            "data": data,  # the splits' fingerprint
            "steps": self.cfg.oracle_steps,
            "lr": oracle_lr,
        }

        def compute() -> InDistributionBounds:
            model, tok, layers = self.base_model()
            oracle, domain = {}, {}
            for group, samples in splits.items():
                res = run_oracle(
                    model, tok, samples, layers, "last", self.cfg.oracle_steps, oracle_lr
                )
                oracle[group] = accuracy_by_task(samples, res.correct).average
                domain[group] = accuracy_by_task(samples, self.transplant(samples)).average
            log.info("in-distribution oracle %s, domain routing %s", oracle, domain)
            return InDistributionBounds(oracle=oracle, domain_routing=domain)

        return self.cached(key, InDistributionBounds, compute)

    def run_all(self) -> QualityResults:
        started = time.perf_counter()
        base = self.scorer.score(None)
        oracle = self.oracle()
        oracle_control = self.oracle_control(oracle.lr)
        domain_routing = self.domain_routing()
        shared_routing = self.shared_routing()
        searches, finals, ablations = self.methods()
        in_distribution = self.in_distribution(finals, oracle.lr)
        domain_mass = self.domain_mass(finals)
        base_test, oracle_test = base["test"], oracle.test

        def gap(acc: Accuracy) -> float | None:
            return gap_closed(acc.average, base_test.average, oracle_test.average)

        return QualityResults(
            config=self.cfg,
            model=self.model,
            sizes={s: len(v) for s, v in self.samples.items()},
            base=base,
            oracle=oracle,
            oracle_control=oracle_control,
            domain_routing=DomainRouting(
                **dict(domain_routing), gap_closed=gap(domain_routing.test)
            ),
            shared_routing=SharedRouting(
                **dict(shared_routing), gap_closed=gap(shared_routing.test)
            ),
            in_distribution=in_distribution,
            domain_mass=domain_mass,
            search=searches,
            methods=summarise(finals, base_test, oracle_test),
            ablations=ablation_stats(ablations, base_test, oracle_test),
            success_set=finals["roma_knn"][0].train_metrics.get("success_set_size"),
            seconds=round(time.perf_counter() - started, 1),
        )


def by_frame(samples: list[Sample], base: list[bool], routed: list[bool]) -> list[FrameRow]:
    """Base and domain-routing accuracy per (task, frame): which phrasings routing can fix."""
    cells: dict[tuple[str, str], list[tuple[bool, bool]]] = {}
    for sample, b, r in zip(samples, base, routed, strict=True):
        found = tasks.frame_of(sample.task, sample.prompt)
        frame = found[1] if found else "?"
        cells.setdefault((sample.task, frame), []).append((b, r))
    return [
        FrameRow(
            task=task,
            frame=frame,
            n=len(pairs),
            base=mean(b for b, _ in pairs),
            domain_routing=mean(r for _, r in pairs),
        )
        for (task, frame), pairs in sorted(cells.items())
    ]


def run_quality(cfg: QualityConfig) -> QualityResults:
    """Everything: the runs, then quality.json, quality.md and the two plots in ``cfg.out``."""
    quality = Quality(cfg)
    results = quality.run_all()
    out = Path(cfg.out)
    if cfg.plots:
        base, oracle = results.base["test"].average, results.oracle.test.average
        shared = results.shared_routing.test.average
        accuracy_plot(
            results.methods, base, oracle, shared, PLOT_TITLE, out / "quality_accuracy.png"
        )
        # The test task where RoMA k-NN gained most over the base, seed-0 patch.
        roma = results.methods["roma_knn"]
        base_tasks = results.base["test"].tasks
        task = max(base_tasks, key=lambda t: roma.tasks_mean[t] - base_tasks[t])
        results.routing_plot_task = task
        if Path(roma.patches[0]).exists():
            samples = [s for s in quality.samples["test"] if s.task == task]
            before, layers = quality.scorer.routing(samples, None)
            after, _ = quality.scorer.routing(samples, roma.patches[0])
            routing_plot(before, after, layers, task, out / "quality_routing.png")
        else:
            log.warning(
                "%s is missing (patches are not committed): quality_routing.png is left as it is",
                roma.patches[0],
            )
    (out / "quality.json").write_text(results.to_json())
    (out / "quality.md").write_text(markdown(results))
    return results
