"""Multiple-choice accuracy per task, behind an lm-eval-style ``loglikelihood`` interface.

A backend only has to answer ``loglikelihood([(context, continuation), ...])`` with
``(sum log-prob, n_tokens, is_greedy)`` per request, tokenizing as :mod:`roma_trainer.scoring`
documents; :class:`HFBackend` does it with a local transformers model, and a gateway backend
can do it through the completions API. Accuracy: the choice with the highest score wins;
``acc`` uses the raw sum, ``acc_norm`` the per-token mean. ``average`` is the unweighted mean
over tasks (each task counts once, whatever its size).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from roma_trainer.data import Sample
from roma_trainer.hidden_cache import HiddenCache
from roma_trainer.scoring import encode_pairs, max_length, score_encoded


@dataclass(frozen=True)
class LoglikelihoodResult:
    logprob: float
    n_tokens: int
    is_greedy: bool


class LoglikelihoodBackend(ABC):
    """What evaluation needs from a model (lm-evaluation-harness's ``loglikelihood``)."""

    @abstractmethod
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LoglikelihoodResult]:
        """Score each (context, continuation) pair; results in request order."""


class HFBackend(LoglikelihoodBackend):
    """A local transformers model, scored in batches of ``batch_size`` requests (the layers
    below ``cache``'s first layer from the cache, when given)."""

    def __init__(
        self, model: nn.Module, tokenizer, batch_size: int = 32, cache: HiddenCache | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.cache = cache

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LoglikelihoodResult]:
        out: list[LoglikelihoodResult] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            enc = encode_pairs(self.tokenizer, chunk, max_length(self.model))
            scores = score_encoded(self.model, enc, self.cache)
            out.extend(
                LoglikelihoodResult(float(lp), int(n), bool(g))
                for lp, n, g in zip(
                    scores.logprob.tolist(),
                    scores.n_tokens.tolist(),
                    scores.is_greedy.tolist(),
                    strict=True,
                )
            )
        return out


@dataclass
class TaskScore:
    n: int
    acc: float
    acc_norm: float


@dataclass
class EvalReport:
    tasks: dict[str, TaskScore]
    average: TaskScore
    extra: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "tasks": {name: asdict(score) for name, score in self.tasks.items()},
            "average": asdict(self.average),
            **self.extra,
        }


def evaluate(backend: LoglikelihoodBackend, samples: Sequence[Sample]) -> EvalReport:
    """Accuracy of ``backend`` on ``samples``, per task and averaged over tasks."""
    requests = [(s.prompt, c) for s in samples for c in s.choices]
    results = backend.loglikelihood(requests)
    hits: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    cursor = 0
    for sample in samples:
        scored = results[cursor : cursor + len(sample.choices)]
        cursor += len(sample.choices)
        raw = max(range(len(scored)), key=lambda c: scored[c].logprob)
        norm = max(range(len(scored)), key=lambda c: scored[c].logprob / scored[c].n_tokens)
        hits[sample.task].append((raw == sample.answer, norm == sample.answer))
    tasks = {
        task: TaskScore(
            n=len(rows),
            acc=sum(r for r, _ in rows) / len(rows),
            acc_norm=sum(n for _, n in rows) / len(rows),
        )
        for task, rows in sorted(hits.items())
    }
    average = TaskScore(
        n=len(samples),
        acc=sum(t.acc for t in tasks.values()) / len(tasks),
        acc_norm=sum(t.acc_norm for t in tasks.values()) / len(tasks),
    )
    return EvalReport(tasks=tasks, average=average)


def render(report: EvalReport, title: str = "accuracy", console: Console | None = None) -> None:
    table = Table(title=title)
    table.add_column("task")
    table.add_column("n", justify="right")
    table.add_column("acc", justify="right")
    table.add_column("acc_norm", justify="right")
    for name, score in report.tasks.items():
        table.add_row(name, str(score.n), f"{score.acc:.4f}", f"{score.acc_norm:.4f}")
    table.add_section()
    avg = report.average
    table.add_row("average", str(avg.n), f"{avg.acc:.4f}", f"{avg.acc_norm:.4f}", style="bold")
    (console or Console()).print(table)


def write_json(report: EvalReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n")
