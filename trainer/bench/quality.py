"""The routing-gap benchmark: base, regularised baselines, RoMA and the oracle, plus ablations.

Protocol (the same for every method, so the comparison is fair):

1. Data (``tasks.py``): a training pool (pretraining + adaptation phrasings), a validation split
   and a test split, each with its own held-out phrasings. Only the pool feeds training, the
   success set and neighbour search; only the validation split picks hyper-parameters.
2. Search: every method trains with every learning rate of ``lr_grid`` (and, for methods with a
   regulariser, every lambda of its ``lam_grid``: three values per method, on a scale where the
   regulariser is comparable to the CE) for ``steps`` optimiser steps with seed 0; the setting
   with the best validation accuracy wins (ties: the earlier grid point).
3. Final: each method's winning setting is run with every seed; the test accuracy is reported as
   mean and std over seeds, with the share of the base->oracle gap it closes.
4. Ablations (RoMA k-NN's winning setting, one factor changed, every seed): tuned layers, token
   position, k, training-data fraction, embedder.
5. Oracle (``oracle.py``) on the test split, its Adam step size picked on the validation split.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import mean, pstdev, stdev
from typing import Any

from roma_models import default_model_dir
from roma_trainer.bench import tasks
from roma_trainer.bench.embedders import build_random_minilm
from roma_trainer.bench.runs import Ledger, Scorer, train_and_score, weights_fingerprint
from roma_trainer.data import Sample, data_fingerprint, load_samples

log = logging.getLogger("roma_trainer.bench")

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
    model: str | None = None  # None: the embedded benchmark model
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


def lam_grid(cfg: QualityConfig, method: str) -> tuple[float | None, ...]:
    objective = METHODS[method]["objective"]
    return (None,) if objective == "ce" else cfg.lam_grid[objective]


class Quality:
    """Runs the protocol of the module docstring and collects everything the report needs."""

    def __init__(self, cfg: QualityConfig, scored: tuple[str, ...] = ("val", "test")) -> None:
        import torch

        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.model = str(cfg.model or default_model_dir())
        self.out = Path(cfg.out)
        self.data_dir = self.out / "data"
        self.paths = tasks.write_splits(
            self.data_dir, cfg.data_seed, cfg.n_train, cfg.n_val, cfg.n_test
        )
        self.samples = {split: load_samples(path) for split, path in self.paths.items()}
        # Runs score the splits in ``scored``: both for the benchmark, validation only for a
        # screen (``screen.py``), whose ledger records therefore must not answer the benchmark.
        self.scorer = Scorer(self.model, {s: self.samples[s] for s in scored})
        # The splits' content is part of every key too: runs name their data by path, and a
        # changed generator rewrites the same paths.
        data = "".join(data_fingerprint(self.samples[s]) for s in ("train", "val", "test"))
        only = "" if scored == ("val", "test") else "/scored:" + ",".join(scored)
        self.ledger = Ledger(
            self.out / "runs.jsonl", weights_fingerprint(self.scorer.loaded.model) + data + only
        )
        self.patch_dir = self.out / "patches"
        self.results: dict[str, Any] = {}

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

    def run(self, method: str, **overrides: Any) -> dict[str, Any]:
        return train_and_score(
            self.scorer, self.ledger, self.train_config(method, **overrides), self.patch_dir
        )

    def base_model(self) -> tuple[Any, Any, list[int]]:
        """The benchmark model with its base routers (any patch undone), its tokenizer and the
        tuned layers (the last five): what every oracle and diagnostic works on."""
        from roma_trainer.routers import find_routers, select_layers

        model = self.scorer.loaded.model
        self.scorer.reset()
        layers = select_layers(list(find_routers(model)), "last5")
        return model, self.scorer.loaded.tokenizer, layers

    @functools.cached_property
    def success_means(self) -> dict[str, Any]:
        """Per task, the mean base routing of its success-set members at the last prompt token
        of the tuned layers (``oracle.success_routing_by_task``): scored once, shared by the
        diagnostics that start from it."""
        from roma_trainer.bench.oracle import success_routing_by_task

        model, tok, layers = self.base_model()
        return success_routing_by_task(model, tok, self.samples["train"], layers)

    def cached(self, key: dict[str, Any], compute: Callable[[], Any]) -> Any:
        """``compute()``, or its value from the ledger: the diagnostics re-score every final
        patch, and a re-run of the benchmark should not spend minutes on scores it has."""
        found = self.ledger.get(key)
        if found is not None:
            return found["result"]
        value = compute()
        self.ledger.add(key, {"result": value})
        return value

    # ------------------------------------------------------------------------------ steps
    def search(self, method: str) -> dict[str, Any]:
        """Grid search on validation accuracy with seed 0; returns the winning overrides."""
        best: tuple[float, dict[str, Any]] | None = None
        grid = []
        for lr in self.cfg.lr_grid:
            for lam in lam_grid(self.cfg, method):
                setting = {"lr": lr, "lam": lam}
                record = self.run(method, seed=self.cfg.seeds[0], **setting)
                grid.append({**setting, "val": record["val"]["average"]})
                if best is None or record["val"]["average"] > best[0]:
                    best = (record["val"]["average"], setting)
        assert best is not None
        return {"best": best[1], "grid": grid}

    def seeds(
        self, method: str, seeds: tuple[int, ...] | None = None, **overrides: Any
    ) -> list[dict[str, Any]]:
        return [self.run(method, seed=s, **overrides) for s in seeds or self.cfg.seeds]

    def oracle(self) -> dict[str, Any]:
        """The oracle on the test split, its step size chosen on val; cached in the ledger."""
        from roma_trainer.bench.oracle import run_oracle

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

        def compute() -> Any:
            lr, val = self.oracle_search()
            model, tok, layers = self.base_model()
            res = run_oracle(model, tok, self.samples["test"], layers, "last", cfg.oracle_steps, lr)
            result = {
                "lr": lr,
                "val_by_lr": {str(k): v["average"] for k, v in val.items()},
                "test": accuracy_by_task(self.samples["test"], res.correct),
                "test_before": accuracy_by_task(self.samples["test"], res.correct_before),
                "gold_nll_before": res.gold_nll_before,
                "gold_nll_after": res.gold_nll_after,
            }
            log.info("oracle test accuracy %.3f (lr %g)", result["test"]["average"], lr)
            return result

        return self.cached(key, compute)

    def oracle_search(self) -> tuple[float, dict[float, dict[str, Any]]]:
        """The oracle on the validation split at every step size of the grid: the winning step
        and each step's accuracy (per task and average)."""
        from roma_trainer.bench.oracle import run_oracle

        cfg = self.cfg
        model, tok, layers = self.base_model()
        val = {}
        for lr in cfg.oracle_lr_grid:
            res = run_oracle(model, tok, self.samples["val"], layers, "last", cfg.oracle_steps, lr)
            val[lr] = accuracy_by_task(self.samples["val"], res.correct)
            log.info("oracle lr=%g val accuracy %.3f", lr, val[lr]["average"])
        return best_on_val(cfg.oracle_lr_grid, {k: v["average"] for k, v in val.items()}), val

    def oracle_control(self, lr: float) -> dict[str, Any]:
        """The oracle's control: the same optimisation (the step size validation picked for the
        oracle) toward a random *wrong* choice of every test sample (seeded). If it moves that
        choice's pick rate as much as the oracle moves the gold's, the oracle's gain measures
        how far one token's routing can steer the answer, not knowledge that routing unlocks."""
        from roma_trainer.bench.oracle import run_oracle

        cfg = self.cfg
        key = {"oracle_control": True, "test": str(self.paths["test"]), "lr": lr}
        key |= {"steps": cfg.oracle_steps, "seed": cfg.data_seed}

        def compute() -> Any:
            model, tok, layers = self.base_model()
            rng = random.Random(f"oracle-control/{cfg.data_seed}")
            wrong = [
                replace(s, answer=rng.choice([i for i in range(len(s.choices)) if i != s.answer]))
                for s in self.samples["test"]
            ]
            res = run_oracle(model, tok, wrong, layers, "last", cfg.oracle_steps, lr)
            return {
                "before": accuracy_by_task(wrong, res.correct_before)["average"],
                "after": accuracy_by_task(wrong, res.correct)["average"],
            }

        return self.cached(key, compute)

    def domain_routing(self) -> dict[str, Any]:
        """Diagnostic bound (uses the task label, so not a method): every val/test sample's
        routing at the tuned layers' last prompt token set to the mean base routing of its
        task's success-set members. How much of the oracle's gap is "route like the samples of
        this task that work", the kind of correction RoMA's neighbours can teach."""
        import torch

        from roma_trainer.bench.oracle import base_correct, correct_with_routing

        key = {
            "domain_routing": True,
            "by_frame": True,
            **{s: str(p) for s, p in self.paths.items()},
        }

        def compute() -> Any:
            model, tok, layers = self.base_model()
            means = self.success_means
            result = {}
            for split in ("val", "test"):
                samples = self.samples[split]
                targets = torch.stack([means[s.task] for s in samples])
                correct = correct_with_routing(model, tok, samples, layers, targets)
                result[split] = accuracy_by_task(samples, correct)
                result[split]["frames"] = by_frame(
                    samples, base_correct(model, tok, samples), correct
                )
            log.info("domain-routing bound: test accuracy %.3f", result["test"]["average"])
            return result

        return self.cached(key, compute)

    def shared_routing(self) -> dict[str, Any]:
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

        def compute() -> Any:
            lr, val = self.shared_search()
            result = {"lr": lr, "val_by_lr": {str(k): v[0]["average"] for k, v in val.items()}}
            result["test"] = self.shared_accuracy("test", lr)[0]
            log.info("task-shared routing oracle: test accuracy %.3f", result["test"]["average"])
            return result

        return self.cached(key, compute)

    def shared_accuracy(self, split: str, lr: float) -> tuple[dict[str, Any], dict[str, Any]]:
        """The task-shared routing oracle on ``split`` at step ``lr``: its accuracy, and the
        accuracy of its starting point (the success-set mean: domain routing)."""
        from roma_trainer.bench.oracle import run_shared_oracle

        model, tok, layers = self.base_model()
        samples, cfg = self.samples[split], self.cfg
        res = run_shared_oracle(
            model, tok, samples, layers, self.success_means, "last", cfg.shared_steps, lr
        )
        return accuracy_by_task(samples, res.correct), accuracy_by_task(samples, res.correct_before)

    def shared_search(self) -> tuple[float, dict[float, tuple[dict[str, Any], dict[str, Any]]]]:
        """:meth:`shared_accuracy` on validation at every step of the grid, and the winner."""
        grid = self.cfg.shared_lr_grid
        val = {lr: self.shared_accuracy("val", lr) for lr in grid}
        return best_on_val(grid, {k: v[0]["average"] for k, v in val.items()}), val

    def domain_mass(self, finals: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """Diagnostic: the routing weight each test sample puts on its own domain's experts (the
        ones pretraining gave that domain, ``pretrain.domain_experts``) at the last prompt token,
        mean over the tuned layers, under the base routers and under every final patch. Says
        whether a method moved routing toward the experts that hold the skill or away."""
        import numpy as np

        from roma_trainer.bench.pretrain import domain_experts

        samples = self.samples["test"]
        names = list(tasks.TASKS)

        def mass(patch: str | None) -> float:
            def compute() -> float:
                routing, _ = routing_snapshot(self.scorer, samples, patch)
                groups = [
                    domain_experts(names.index(s.task), len(names), routing.shape[-1])
                    for s in samples
                ]
                # routing[i][:, g], not routing[i, :, g]: numpy would put the expert axis first.
                return float(
                    np.mean([routing[i][:, g].sum(-1).mean() for i, g in enumerate(groups)])
                )

            return self.cached({"domain_mass": patch}, compute)

        out: dict[str, Any] = {"base": mass(None)}
        for method, runs in finals.items():
            values = [mass(r["patch"]) for r in runs]
            out[method] = {"mean": mean(values), "std": pstdev(values)}
        return out

    def in_distribution(
        self, finals: dict[str, list[dict[str, Any]]], oracle_lr: float
    ) -> dict[str, Any]:
        """Diagnostic: the final patches on fresh instances of the pool's own phrasings
        (pretraining and adaptation frames, prompts not in the pool), with the oracle and the
        domain-routing diagnostic there. Tells "the routers learnt nothing" apart from "what
        they learnt does not transfer to held-out phrasings"."""
        pool = {s.prompt for s in self.samples["train"]}
        splits = {}
        for group in ("pretrain", "adapt"):
            rows = tasks.generate("train", self.cfg.n_val, self.cfg.data_seed + 1, (group,))
            splits[group] = [
                Sample(r["task"], r["prompt"], tuple(r["choices"]), r["answer"])
                for r in rows
                if r["prompt"] not in pool
            ]
        scorer = Scorer(self.model, splits)
        out: dict[str, Any] = {"sizes": {g: len(v) for g, v in splits.items()}}
        out["base"] = {g: v["average"] for g, v in scorer.score(None).items()}
        data = data_fingerprint([s for v in splits.values() for s in v])
        out.update(self.in_distribution_bounds(splits, data, oracle_lr))
        for method, runs in finals.items():
            scores = [
                self.cached(
                    {"in_distribution_score": r["patch"], "data": data},
                    lambda patch=r["patch"]: scorer.score(Path(patch)),
                )
                for r in runs
            ]
            out[method] = {
                g: {
                    "mean": mean(s[g]["average"] for s in scores),
                    "std": pstdev([s[g]["average"] for s in scores]),
                    "gap_closed": gap_closed(
                        mean(s[g]["average"] for s in scores),
                        out["base"][g],
                        out["oracle"][g],
                    ),
                }
                for g in splits
            }
        return out

    def in_distribution_bounds(
        self, splits: dict[str, list[Sample]], data: str, oracle_lr: float
    ) -> dict[str, dict[str, float]]:
        """The oracle (the step size validation picked) and the domain-routing diagnostic on
        the in-distribution sets, so that a method's share of the gap can be read where test
        and pool phrasings agree, the setting of the paper's benchmarks; cached."""
        import torch

        from roma_trainer.bench.oracle import correct_with_routing, run_oracle

        key = {
            "in_distribution_bounds": True,
            "data": data,  # the splits' fingerprint
            "steps": self.cfg.oracle_steps,
            "lr": oracle_lr,
        }

        def compute() -> Any:
            model, tok, layers = self.base_model()
            means = self.success_means
            result: dict[str, dict[str, float]] = {"oracle": {}, "domain_routing": {}}
            for group, samples in splits.items():
                res = run_oracle(
                    model, tok, samples, layers, "last", self.cfg.oracle_steps, oracle_lr
                )
                result["oracle"][group] = accuracy_by_task(samples, res.correct)["average"]
                targets = torch.stack([means[s.task] for s in samples])
                correct = correct_with_routing(model, tok, samples, layers, targets)
                result["domain_routing"][group] = accuracy_by_task(samples, correct)["average"]
            log.info("in-distribution oracle %s, domain routing %s", *result.values())
            return result

        return self.cached(key, compute)

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
        tasks.write_jsonl([sample_json(s) for s in keep], path)
        return str(path)

    def ablations(self, best: dict[str, Any]) -> dict[str, dict[str, list[dict[str, Any]]]]:
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
        return {
            factor: {
                name: self.seeds("roma_knn", cfg.ablation_seeds, **best, **o)
                for name, o in options.items()
            }
            for factor, options in plan.items()
        }

    # ------------------------------------------------------------------------------ all
    def run_all(self) -> dict[str, Any]:
        started = time.perf_counter()
        base = self.scorer.score(None)
        oracle = self.oracle()
        oracle_control = self.oracle_control(oracle["lr"])
        domain_routing = self.domain_routing()
        shared_routing = self.shared_routing()
        searches = {m: self.search(m) for m in METHODS}
        finals = {m: self.seeds(m, **searches[m]["best"]) for m in METHODS}
        ablations = self.ablations(searches["roma_knn"]["best"]) if self.cfg.ablations else {}
        in_distribution = self.in_distribution(finals, oracle["lr"])
        domain_mass = self.domain_mass(finals)
        summary = summarise(base, oracle, finals)
        self.results = {
            "config": {
                k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.cfg).items()
            },
            "model": self.model,
            "sizes": {s: len(v) for s, v in self.samples.items()},
            "base": base,
            "oracle": oracle,
            "oracle_control": oracle_control,
            "domain_routing": {
                **domain_routing,
                "gap_closed": gap_closed(
                    domain_routing["test"]["average"],
                    base["test"]["average"],
                    oracle["test"]["average"],
                ),
            },
            "shared_routing": {
                **shared_routing,
                "gap_closed": gap_closed(
                    shared_routing["test"]["average"],
                    base["test"]["average"],
                    oracle["test"]["average"],
                ),
            },
            "in_distribution": in_distribution,
            "domain_mass": domain_mass,
            "search": searches,
            "methods": summary,
            "ablations": {
                factor: {name: seed_stats(runs, base, oracle) for name, runs in opts.items()}
                for factor, opts in ablations.items()
            },
            "success_set": finals["roma_knn"][0]["train_metrics"].get("success_set_size"),
            "seconds": round(time.perf_counter() - started, 1),
        }
        return self.results


def sample_json(s: Sample) -> dict[str, Any]:
    return {"task": s.task, "prompt": s.prompt, "choices": list(s.choices), "answer": s.answer}


def accuracy_by_task(samples: list[Sample], correct: list[bool]) -> dict[str, Any]:
    by_task: dict[str, list[bool]] = {}
    for s, ok in zip(samples, correct, strict=True):
        by_task.setdefault(s.task, []).append(ok)
    accs = {t: sum(v) / len(v) for t, v in sorted(by_task.items())}
    return {"tasks": accs, "average": mean(accs.values())}


def by_frame(samples: list[Sample], base: list[bool], routed: list[bool]) -> list[dict[str, Any]]:
    """Base and domain-routing accuracy per (task, frame): which phrasings routing can fix."""
    cells: dict[tuple[str, str], list[tuple[bool, bool]]] = {}
    for sample, b, r in zip(samples, base, routed, strict=True):
        found = tasks.frame_of(sample.task, sample.prompt)
        frame = found[1] if found else "?"
        cells.setdefault((sample.task, frame), []).append((b, r))
    return [
        {
            "task": task,
            "frame": frame,
            "n": len(pairs),
            "base": mean(b for b, _ in pairs),
            "domain_routing": mean(r for _, r in pairs),
        }
        for (task, frame), pairs in sorted(cells.items())
    ]


def best_on_val(grid: tuple[float, ...], val: dict[float, float]) -> float:
    """The grid point with the best validation accuracy; ties go to the earlier point."""
    return max(grid, key=lambda x: (val[x], -grid.index(x)))


def gap_closed(acc: float, base: float, oracle: float) -> float | None:
    return None if oracle <= base else (acc - base) / (oracle - base)


def seed_stats(runs: list[dict[str, Any]], base: dict, oracle: dict) -> dict[str, Any]:
    """Mean/std over seeds of the test (and val) accuracy, per task and on average."""
    test = [r["test"]["average"] for r in runs]
    task_names = list(runs[0]["test"]["tasks"])
    return {
        "test_mean": mean(test),
        "test_std": pstdev(test),
        "test_runs": test,
        "val_mean": mean(r["val"]["average"] for r in runs),
        "tasks_mean": {t: mean(r["test"]["tasks"][t] for r in runs) for t in task_names},
        "gap_closed": gap_closed(mean(test), base["test"]["average"], oracle["test"]["average"]),
        "train_acc_after": mean(r["train_metrics"].get("train_acc_after", 0.0) for r in runs),
        # Share of the pool with at least one neighbour in S (manifold objectives only).
        "with_neighbours": mean(
            1 - m["samples_without_neighbours"] / m["num_samples"]
            for m in (r["train_metrics"] for r in runs)
        )
        if "samples_without_neighbours" in runs[0]["train_metrics"]
        else None,
        "train_seconds": mean(r["train_seconds"] for r in runs),
        "patches": [r["patch"] for r in runs],
    }


def paired_difference(
    runs: list[dict[str, Any]], reference: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Test-accuracy difference to ``reference``, seed by seed: a seed fixes the batch order,
    so the pairs share it and the spread left is the method's. Mean and a two-sided 95 %
    Student-t interval over the seeds (None with fewer than two shared seeds)."""
    from scipy import stats

    ref = {r["config"]["seed"]: r["test"]["average"] for r in reference}
    diffs = [
        r["test"]["average"] - ref[r["config"]["seed"]] for r in runs if r["config"]["seed"] in ref
    ]
    if len(diffs) < 2:
        return None
    half = float(stats.t.ppf(0.975, len(diffs) - 1)) * stdev(diffs) / len(diffs) ** 0.5
    return {"mean": mean(diffs), "low": mean(diffs) - half, "high": mean(diffs) + half}


def summarise(base: dict, oracle: dict, finals: dict[str, list[dict]]) -> dict[str, Any]:
    out = {m: seed_stats(runs, base, oracle) for m, runs in finals.items()}
    for m, runs in finals.items():
        out[m]["vs_ce"] = paired_difference(runs, finals["ce"]) if m != "ce" else None
    return out


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def routing_snapshot(
    scorer: Scorer, samples: list[Sample], patch: str | None, layers_spec: str = "last5"
) -> tuple[Any, list[int]]:
    """Routing weights ``[n, layers, experts]`` at the last prompt token of ``samples`` under
    the base routers (``patch=None``) or a patch, captured by the trainer's RoutingCapture."""
    import torch

    from roma_trainer.apply import apply_patch
    from roma_trainer.routers import RoutingCapture, find_routers, select_layers
    from roma_trainer.scoring import score_samples

    model, tok = scorer.loaded.model, scorer.loaded.tokenizer
    layers = select_layers(list(find_routers(model)), layers_spec)
    scorer.reset()
    if patch is not None:
        apply_patch(model, patch, scorer.loaded.model_id)
    try:
        with torch.no_grad(), RoutingCapture(model, layers) as capture:
            routing = score_samples(model, tok, samples, "last", capture).routing
    finally:
        scorer.reset()
    assert routing is not None
    return routing.numpy(), layers


def run_quality(cfg: QualityConfig) -> dict[str, Any]:
    """Everything: the runs, then quality.json, quality.md and the two plots in ``cfg.out``."""
    from roma_trainer.bench import report

    quality = Quality(cfg)
    results = quality.run_all()
    out = Path(cfg.out)
    if cfg.plots:
        report.accuracy_plot(results, out / "quality_accuracy.png")
        # The test task where RoMA k-NN gained most over the base, seed-0 patch.
        roma = results["methods"]["roma_knn"]
        base_tasks = results["base"]["test"]["tasks"]
        task = max(base_tasks, key=lambda t: roma["tasks_mean"][t] - base_tasks[t])
        samples = [s for s in quality.samples["test"] if s.task == task]
        before, layers = routing_snapshot(quality.scorer, samples, None)
        after, _ = routing_snapshot(quality.scorer, samples, roma["patches"][0])
        report.routing_plot(before, after, layers, task, out / "quality_routing.png")
        results["routing_plot_task"] = task
    write_json(results, out / "quality.json")
    (out / "quality.md").write_text(report.markdown(results))
    return results
