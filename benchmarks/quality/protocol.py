"""The protocol every quality benchmark runs on its splits, the same for every method so that the
comparison is fair.

1. Data (from the benchmark): a training pool, a validation split and a test split. Only the
   pool feeds training, the success set and neighbour search; only validation picks
   hyper-parameters; test only reports.
2. Search: every method trains with every learning rate of ``lr_grid`` (and, for methods with a
   regulariser, every lambda of its ``lam_grid``: three values per method, on a scale where the
   regulariser is comparable to the CE) for ``steps`` optimiser steps with seed 0; the setting
   with the best validation accuracy wins (ties: the earlier grid point).
3. Final: each method's winning setting is run with every seed; the test accuracy is reported as
   mean and std over seeds, with the share of the base->oracle gap it closes.
4. Ablations (RoMA k-NN's winning setting, one factor changed, every ablation seed): tuned
   layers, token position, k, training-data fraction, embedder.
5. Oracle (``oracle.py``) on the test split, its Adam step size picked on validation; its
   control; and the task-shared routing bound.

Every run and every costly diagnostic is cached in the ledger (``runs.py``), so a re-run only
computes what is new.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import TypeAdapter

from roma_bench.embedders import build_random_minilm
from roma_bench.oracle import (
    correct_with_routing,
    neighbour_routing_targets,
    pool_routing,
    run_oracle,
    run_shared_oracle,
    task_success_means,
)
from roma_bench.results import (
    Accuracy,
    GridPoint,
    NeighbourRouting,
    OracleControl,
    OracleFound,
    RunRecord,
    Search,
    Setting,
    SharedRoutingFound,
)
from roma_bench.runs import (
    Ledger,
    Scorer,
    train_and_score,
    try_train_and_score,
    weights_fingerprint,
)
from roma_bench.samples import sample_row, write_jsonl
from roma_bench.stats import accuracy_by_task, best_on_val
from roma_trainer.data import Sample, data_fingerprint, load_samples
from roma_trainer.hidden_cache import HiddenCache
from roma_trainer.routers import find_routers, select_layers

log = logging.getLogger("roma_bench")

T = TypeVar("T")

# Method name -> TrainConfig fields. "random" is RoMA's loss with random members of S.
METHODS: dict[str, dict[str, Any]] = {
    "ce": {"objective": "ce"},
    "l1": {"objective": "l1"},
    "l2": {"objective": "l2"},
    "entropy": {"objective": "entropy"},
    "random": {"objective": "manifold", "neighbours": "random", "k": 3},
    "roma_knn": {"objective": "manifold", "neighbours": "knn", "k": 3},
    "roma_eps": {"objective": "manifold", "neighbours": "eps", "eps": 0.5},
}
HEADLINE: tuple[str, ...] = ("ce", "roma_knn")
LABELS = {
    "base": "Base",
    "ce": "CE only",
    "l1": "L1",
    "l2": "L2",
    "entropy": "Entropy",
    "random": "Random neighbours",
    "roma_knn": "RoMA k-NN (k=3)",
    "roma_eps": "RoMA eps-ball",
    "oracle": "Oracle",
}


@dataclass
class QualityConfig:
    model: str | None = None  # None: the benchmark's own model
    out: Path = Path("results")
    data_seed: int = 0
    n_train: int = 100  # per task
    n_val: int = 40
    n_test: int = 100
    # Five seeds for the methods: paired differences between methods need them (with three,
    # a 95 % interval is +-4.3 standard errors wide).
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 100
    batch_size: int = 16
    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    # Three lambdas per regulariser, spanning two decades around where it matches the CE.
    lam_grid: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "l1": (1e-4, 1e-3, 1e-2),
            "l2": (1e-3, 1e-2, 1e-1),
            "entropy": (0.01, 0.1, 1.0),
            "manifold": (0.1, 1.0, 10.0),
        }
    )
    oracle_steps: int = 10
    oracle_lr_grid: tuple[float, ...] = (0.1, 0.3, 1.0)
    # The task-shared routing oracle (a diagnostic): full-batch Adam steps per task.
    shared_steps: int = 30
    shared_lr_grid: tuple[float, ...] = (0.1, 0.3, 1.0)
    ablations: bool = True
    ablation_k: tuple[int, ...] = (1, 5, 10)
    ablation_fractions: tuple[float, ...] = (0.1, 0.3)
    ablation_seeds: tuple[int, ...] | None = (0, 1, 2)  # None: the same seeds as the methods
    plots: bool = True
    # One intra-op thread: on shared cores two threads spin against each other and a run
    # takes 5-20x longer (measured); on an idle machine it costs at most 2x.
    threads: int = 1

    @classmethod
    def small(cls, out: Path = Path("results/small")) -> QualityConfig:
        """A few minutes on two cores: tiny splits, two seeds, one grid point per method."""
        return cls(
            out=out,
            n_train=12,
            n_val=4,
            n_test=6,
            seeds=(0, 1),
            steps=4,
            batch_size=8,
            lr_grid=(3e-3,),
            lam_grid={"l1": (1e-3,), "l2": (1e-2,), "entropy": (0.1,), "manifold": (1.0,)},
            oracle_steps=3,
            oracle_lr_grid=(0.3,),
            shared_steps=3,
            shared_lr_grid=(0.3,),
            ablation_k=(1,),
            ablation_fractions=(0.5,),
            ablation_seeds=(0,),
        )

    def lams(self, method: str) -> tuple[float | None, ...]:
        """The lambdas a method is searched over (CE has no regulariser: just None)."""
        objective = METHODS[method]["objective"]
        return (None,) if objective == "ce" else self.lam_grid[objective]


class Protocol:
    """The protocol's steps on one model and one set of splits (``paths``: train, val, test).

    ``scored`` are the splits every run is scored on: both for a benchmark, validation only
    for a screen, whose ledger records therefore must not answer the benchmark.
    """

    def __init__(
        self,
        cfg: QualityConfig,
        model: str,
        paths: dict[str, Path],
        scored: tuple[str, ...] = ("val", "test"),
        hidden_dir: Path | None = None,
    ) -> None:
        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.model = model
        self.out = Path(cfg.out)
        self.data_dir = self.out / "data"
        self.paths = paths
        self.samples = {split: load_samples(path) for split, path in paths.items()}
        self.scorer = Scorer(model, {s: self.samples[s] for s in scored}, hidden_dir=hidden_dir)
        # The splits' content is part of every key too: runs name their data by path, and a
        # changed generator rewrites the same paths.
        data = "".join(data_fingerprint(self.samples[s]) for s in ("train", "val", "test"))
        only = "" if scored == ("val", "test") else "/scored:" + ",".join(scored)
        self.ledger = Ledger(
            self.out / "runs.jsonl", weights_fingerprint(self.scorer.loaded.model) + data + only
        )
        self.patch_dir = self.out / "patches"

    # ------------------------------------------------------------------------------ runs
    def train_config(self, method: str, **overrides: Any) -> dict[str, Any]:
        cfg = self.cfg
        base = {
            "model": self.model,
            "data": str(self.paths["train"]),
            "layers": "last5",
            "token": "last",
            "max_steps": cfg.steps,
            "epochs": 1000,  # max_steps decides
            "batch_size": cfg.batch_size,
            **METHODS[method],
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        return base

    def run(self, method: str, **overrides: Any) -> RunRecord:
        return train_and_score(
            self.scorer, self.ledger, self.train_config(method, **overrides), self.patch_dir
        )

    def try_run(self, method: str, **overrides: Any) -> RunRecord | None:
        """:meth:`run`, or None while another worker sharing the ledger trains it."""
        return try_train_and_score(
            self.scorer, self.ledger, self.train_config(method, **overrides), self.patch_dir
        )

    def runs(self, method: str, settings: list[dict[str, Any]]) -> list[RunRecord]:
        """``method``'s runs with each of ``settings`` (independent of each other): first those
        no other worker sharing the ledger is training, then the others, waited for."""
        first = [self.try_run(method, **s) for s in settings]
        return [r or self.run(method, **s) for r, s in zip(first, settings, strict=True)]

    def seeds(
        self, method: str, seeds: tuple[int, ...] | None = None, **overrides: Any
    ) -> list[RunRecord]:
        return self.runs(method, [{"seed": s, **overrides} for s in seeds or self.cfg.seeds])

    def search(self, method: str) -> Search:
        """Grid search on validation accuracy with seed 0."""
        points = [(lr, lam) for lr in self.cfg.lr_grid for lam in self.cfg.lams(method)]
        seed = self.cfg.seeds[0]
        runs = self.runs(method, [{"seed": seed, "lr": lr, "lam": lam} for lr, lam in points])
        best: tuple[float, Setting] | None = None
        grid = []
        for (lr, lam), run in zip(points, runs, strict=True):
            val = run.val.average
            grid.append(GridPoint(lr=lr, lam=lam, val=val))
            if best is None or val > best[0]:
                best = (val, Setting(lr=lr, lam=lam))
        assert best is not None
        return Search(best=best[1], grid=grid)

    def methods(
        self,
    ) -> tuple[
        dict[str, Search], dict[str, list[RunRecord]], dict[str, dict[str, list[RunRecord]]]
    ]:
        """Every method's search, its winner with every seed, and the ablations (when on)."""
        searches, finals = self.searches_and_finals()
        ablations = self.ablations(searches["roma_knn"].best) if self.cfg.ablations else {}
        return searches, finals, ablations

    def searches_and_finals(
        self, methods: tuple[str, ...] = tuple(METHODS)
    ) -> tuple[dict[str, Search], dict[str, list[RunRecord]]]:
        """``methods``' searches and their winners with every seed, CE and RoMA k-NN first: on
        a slow machine the headline comparison is in the ledger hours before the rest."""
        searches, finals = {}, {}
        for m in sorted(methods, key=lambda m: m not in HEADLINE):
            searches[m] = self.search(m)
            finals[m] = self.seeds(m, lr=searches[m].best.lr, lam=searches[m].best.lam)
        order = [m for m in METHODS if m in searches]
        return {m: searches[m] for m in order}, {m: finals[m] for m in order}

    def ablations(self, best: Setting) -> dict[str, dict[str, list[RunRecord]]]:
        """RoMA k-NN at its winning setting with one factor changed, every ablation seed. All
        of them go to :meth:`runs` at once: workers sharing the ledger split them and wait only
        at the end, not after each factor."""
        cfg = self.cfg
        weak = build_random_minilm(self.out / "embedders" / "random-minilm")
        plan: dict[str, dict[str, dict[str, Any]]] = {
            "layers": {"last1": {"layers": "last1"}, "last5": {}, "all": {"layers": "all"}},
            "token": {"last": {}, "first": {"token": "first"}, "middle": {"token": "middle"}},
            "k": {str(k): {"k": k} for k in sorted({*cfg.ablation_k, 3})},
            "fraction": {
                **{
                    f"{round(f * 100)}%": {"data": self.fraction_data(f)}
                    for f in cfg.ablation_fractions
                },
                "100%": {},
            },
            "embedder": {"MiniLM": {}, "random-init MiniLM": {"embedder": str(weak)}},
        }
        seeds = cfg.ablation_seeds or cfg.seeds
        cells = [(f, name) for f, options in plan.items() for name in options]
        settings = [
            {"seed": s, "lr": best.lr, "lam": best.lam, **plan[f][name]}
            for f, name in cells
            for s in seeds
        ]
        runs = iter(self.runs("roma_knn", settings))
        found: dict[str, dict[str, list[RunRecord]]] = {f: {} for f in plan}
        for f, name in cells:
            found[f][name] = [next(runs) for _ in seeds]
        return found

    def fraction_data(self, fraction: float) -> str:
        """A seeded subset of the pool, stratified by task, written beside the splits."""
        rng = random.Random(f"fraction/{fraction}/{self.cfg.data_seed}")
        by_task: dict[str, list[Sample]] = {}
        for s in self.samples["train"]:
            by_task.setdefault(s.task, []).append(s)
        keep = []
        for rows in by_task.values():
            keep += rng.sample(rows, max(2, round(fraction * len(rows))))
        path = self.data_dir / f"train_{round(fraction * 100)}pct.jsonl"
        return str(write_jsonl(map(sample_row, keep), path))

    # ------------------------------------------------------------------------------ cache
    def cached(self, key: dict[str, Any], kind: type[T], compute: Callable[[], T]) -> T:
        """``compute()``, or its value from the ledger: the diagnostics re-score every final
        patch, and a re-run of the benchmark should not spend minutes on scores it has."""
        adapter = TypeAdapter(kind)
        found = self.ledger.get(key)
        if found is not None:
            return adapter.validate_python(found["result"])
        value = compute()
        self.ledger.add(key, {"result": adapter.dump_python(value)})
        return value

    # ------------------------------------------------------------------------------ bounds
    def base_model(self) -> tuple[torch.nn.Module, Any, list[int]]:
        """The benchmark model with its base routers (any patch undone), its tokenizer and the
        tuned layers (the last five): what every oracle and diagnostic works on."""
        model = self.scorer.loaded.model
        self.scorer.reset()
        layers = select_layers(list(find_routers(model)), "last5")
        return model, self.scorer.loaded.tokenizer, layers

    def base_scores(self) -> dict[str, Accuracy]:
        """The base routers on every scored split; cached, so that the ledger alone says where
        a run stands (``roma-bench progress``)."""
        return self.cached({"base_score": True}, dict[str, Accuracy], self.scorer.score)

    @functools.cached_property
    def pool_routing(self) -> tuple[torch.Tensor, list[bool]]:
        """The base routing of every pool sample at the last prompt token of the tuned layers,
        and whether the base answers it (``oracle.pool_routing``): scored once, shared by the
        diagnostics that start from the success set."""
        model, tok, layers = self.base_model()
        return pool_routing(model, tok, self.samples["train"], layers, cache=self.cache)

    @functools.cached_property
    def success_means(self) -> dict[str, torch.Tensor]:
        """Per task, the mean base routing of its success-set members
        (``oracle.task_success_means``)."""
        return task_success_means(self.samples["train"], *self.pool_routing)

    def neighbour_routing(self) -> NeighbourRouting:
        """Diagnostic of RoMA's premise, no training and no labels of the scored samples: each
        test sample's routing set to the kernel-weighted mean of its k = 3 nearest success-set
        members' (MiniLM), where RoMA's term pulls it, and to 3 random members' (the control).
        If its neighbours' routing does not answer a sample better than its own, pulling its
        routing toward theirs cannot be expected to; cached."""
        cfg = self.cfg
        key = {"neighbour_routing": True, **{s: str(p) for s, p in self.paths.items()}}
        key |= {"k": 3, "seed": cfg.data_seed, "model": self.model}

        def compute() -> NeighbourRouting:
            model, tok, layers = self.base_model()
            pool, test = self.samples["train"], self.samples["test"]
            routing, correct = self.pool_routing
            targets = neighbour_routing_targets(
                pool, routing, correct, test, ("knn", "random"), 3, cfg.data_seed
            )
            found: dict[str, Accuracy] = {}
            for mode, (target, _) in targets.items():
                hits = correct_with_routing(model, tok, test, layers, target, cache=self.cache)
                found[mode] = accuracy_by_task(test, hits)
                log.info("neighbour routing (%s) test accuracy %.3f", mode, found[mode].average)
            sigma = targets["knn"][1]
            return NeighbourRouting(k=3, sigma=sigma, base=self.base_scores()["test"], **found)

        return self.cached(key, NeighbourRouting, compute)

    @property
    def cache(self) -> HiddenCache | None:
        """The scorer's states below the MoE layers (None: not kept); every tuned layer and
        every routing hook of the diagnostics lies above them."""
        return self.scorer.cache

    def oracle(self) -> OracleFound:
        """The oracle on the test split, its step size chosen on val; cached."""
        cfg = self.cfg
        key = {
            "oracle": True,
            "model": self.model,
            "val": str(self.paths["val"]),
            "test": str(self.paths["test"]),
            "sizes": [cfg.n_val, cfg.n_test, cfg.data_seed],
            "steps": cfg.oracle_steps,
            "lr_grid": list(cfg.oracle_lr_grid),
        }

        def compute() -> OracleFound:
            lr, val = self.oracle_search()
            model, tok, layers = self.base_model()
            test = self.samples["test"]
            res = run_oracle(
                model, tok, test, layers, "last", cfg.oracle_steps, lr, cache=self.cache
            )
            found = OracleFound(
                lr=lr,
                val_by_lr={str(k): v.average for k, v in val.items()},
                test=accuracy_by_task(test, res.correct),
                test_before=accuracy_by_task(test, res.correct_before),
                gold_nll_before=res.gold_nll_before,
                gold_nll_after=res.gold_nll_after,
            )
            log.info("oracle test accuracy %.3f (lr %g)", found.test.average, lr)
            return found

        return self.cached(key, OracleFound, compute)

    def oracle_search(self) -> tuple[float, dict[float, Accuracy]]:
        """The oracle on the validation split at every step size of the grid: the winning step
        and each step's accuracy."""
        cfg = self.cfg
        model, tok, layers = self.base_model()
        val = {}
        for lr in cfg.oracle_lr_grid:
            res = run_oracle(
                model, tok, self.samples["val"], layers, "last", cfg.oracle_steps, lr,
                cache=self.cache,
            )  # fmt: skip
            val[lr] = accuracy_by_task(self.samples["val"], res.correct)
            log.info("oracle lr=%g val accuracy %.3f", lr, val[lr].average)
        return best_on_val(cfg.oracle_lr_grid, {k: v.average for k, v in val.items()}), val

    def oracle_control(self, lr: float) -> OracleControl:
        """The oracle's control: the same optimisation (the step size validation picked for the
        oracle) toward a random *wrong* choice of every test sample (seeded). If it moves that
        choice's pick rate as much as the oracle moves the gold's, the oracle's gain measures
        how far one token's routing can steer the answer, not knowledge that routing unlocks."""
        cfg = self.cfg
        key = {"oracle_control": True, "test": str(self.paths["test"]), "lr": lr}
        key |= {"steps": cfg.oracle_steps, "seed": cfg.data_seed}

        def compute() -> OracleControl:
            model, tok, layers = self.base_model()
            rng = random.Random(f"oracle-control/{cfg.data_seed}")
            wrong = [
                replace(s, answer=rng.choice([i for i in range(len(s.choices)) if i != s.answer]))
                for s in self.samples["test"]
            ]
            res = run_oracle(
                model, tok, wrong, layers, "last", cfg.oracle_steps, lr, cache=self.cache
            )
            return OracleControl(
                before=accuracy_by_task(wrong, res.correct_before).average,
                after=accuracy_by_task(wrong, res.correct).average,
            )

        return self.cached(key, OracleControl, compute)

    def transplant(self, samples: list[Sample]) -> list[bool]:
        """Whether each sample is answered correctly when its routing at the tuned layers' last
        prompt token is set to the success-set mean of its task (domain routing)."""
        model, tok, layers = self.base_model()
        targets = torch.stack([self.success_means[s.task] for s in samples])
        return correct_with_routing(model, tok, samples, layers, targets, cache=self.cache)

    def shared_routing(self) -> SharedRoutingFound:
        """Diagnostic bound (uses the labels): the best routing shared by all samples of a task
        (``oracle.run_shared_oracle``, started from the success-set mean), its step size picked
        on val. How much of the oracle's gap any "route like the other samples of your task"
        correction can close, with the answers in hand; cached."""
        cfg = self.cfg
        key = {
            "shared_routing": True,
            **{s: str(p) for s, p in self.paths.items()},
            "steps": cfg.shared_steps,
            "lr_grid": list(cfg.shared_lr_grid),
        }

        def compute() -> SharedRoutingFound:
            lr, val = self.shared_search()
            found = SharedRoutingFound(
                lr=lr,
                val_by_lr={str(k): v[0].average for k, v in val.items()},
                test=self.shared_accuracy("test", lr)[0],
            )
            log.info("task-shared routing oracle: test accuracy %.3f", found.test.average)
            return found

        return self.cached(key, SharedRoutingFound, compute)

    def shared_accuracy(self, split: str, lr: float) -> tuple[Accuracy, Accuracy]:
        """The task-shared routing oracle on ``split`` at step ``lr``: its accuracy, and the
        accuracy of its starting point (the success-set mean: domain routing)."""
        model, tok, layers = self.base_model()
        samples, cfg = self.samples[split], self.cfg
        res = run_shared_oracle(
            model, tok, samples, layers, self.success_means, "last", cfg.shared_steps, lr,
            cache=self.cache,
        )  # fmt: skip
        return accuracy_by_task(samples, res.correct), accuracy_by_task(samples, res.correct_before)

    def shared_search(self) -> tuple[float, dict[float, tuple[Accuracy, Accuracy]]]:
        """:meth:`shared_accuracy` on validation at every step of the grid, and the winner."""
        grid = self.cfg.shared_lr_grid
        val = {}
        for lr in grid:
            val[lr] = self.shared_accuracy("val", lr)
            log.info("task-shared routing lr=%g val accuracy %.3f", lr, val[lr][0].average)
        return best_on_val(grid, {k: v[0].average for k, v in val.items()}), val
