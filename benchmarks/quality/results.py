"""Typed results of a quality benchmark: what the protocol computes, the report renders and the
ledger and ``quality.json`` store.

Every model dumps to exactly the JSON the benchmark has always written (field names and
nesting), so that a ledger written by an earlier run validates here and ``quality.json`` keeps
its published shape. Models that the ledger caches (``*Found``) leave out what is derived after
the lookup (the share of the oracle's gap), so a cached record stays what it was.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class Model(BaseModel):
    """Strict about unknown keys: a record of another shape is an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


def config_json(cfg: Any) -> dict[str, Any]:
    """A benchmark's config dataclass as JSON values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}


class Accuracy(Model):
    """Accuracy per task and the unweighted mean over tasks."""

    tasks: dict[str, float]
    average: float


class RunRecord(Model):
    """One ledger line of a training run: the trainer's config, its patch, and its scores."""

    key: str
    config: dict[str, Any]  # TrainConfig fields, exactly as hashed into ``key``
    patch: str
    train_seconds: float
    train_metrics: dict[str, Any]
    val: Accuracy
    test: Accuracy | None = None  # a screen scores validation only

    @property
    def seed(self) -> int:
        return self.config["seed"]


class Setting(Model):
    """A method's hyper-parameters (``lam`` None for CE, which has no regulariser)."""

    lr: float
    lam: float | None


class GridPoint(Setting):
    val: float


class Search(Model):
    best: Setting
    grid: list[GridPoint]


class PairedDifference(Model):
    """Mean difference to a reference method and its two-sided 95 % Student-t interval."""

    mean: float
    low: float
    high: float


class SeedStats(Model):
    """A setting run with every seed: test accuracy mean/std and what the report shows."""

    test_mean: float
    test_std: float
    test_runs: list[float]
    val_mean: float
    tasks_mean: dict[str, float]
    gap_closed: float | None
    train_acc_after: float
    with_neighbours: float | None  # share of the pool with a neighbour in S (manifold only)
    train_seconds: float
    patches: list[str]


class MethodStats(SeedStats):
    vs_ce: PairedDifference | None  # None for CE itself


class OracleFound(Model):
    """The per-sample routing oracle on test, its Adam step size picked on validation."""

    lr: float
    val_by_lr: dict[str, float]
    test: Accuracy
    test_before: Accuracy  # the base routing: the oracle's starting point
    gold_nll_before: float
    gold_nll_after: float


class OracleControl(Model):
    """Pick rate of a random wrong choice before and after optimising the routing toward it."""

    before: float
    after: float


class SharedRoutingFound(Model):
    """The best routing shared by all samples of a task, its step size picked on validation."""

    lr: float
    val_by_lr: dict[str, float]
    test: Accuracy


class SharedRouting(SharedRoutingFound):
    gap_closed: float | None


class NeighbourRouting(Model):
    """RoMA's premise, tested without training: test accuracy when each test sample's routing
    (tuned layers, last prompt token) is set to the kernel-weighted mean routing of its k
    nearest success-set members in the embedder's space (where RoMA's term pulls it), against
    k random members (the control) and its own (base)."""

    k: int
    sigma: float
    base: Accuracy
    knn: Accuracy
    random: Accuracy
