"""The real benchmark's splits: a seeded, capped subsample of OLMES data per task, written as
JSONL so that every run names its data by path and the ledger can fingerprint it.

Roles and where they come from (each source shuffled once with a seed of its own, then consumed
in order, so no sample lands in two roles):

* pool (training pool, success set, neighbours): the task's ``train`` split, else its
  ``validation`` split;
* val (every hyper-parameter): ``validation``;
* test (reports only): ``test`` when the task has one, else ``validation``.

When several roles draw on one source (SciQ and COPA have only ``validation``; PIQA, HellaSwag
and SIQA share it between val and test) and the caps add up to more than it holds, each role's
cap is scaled down in proportion (COPA's 100 samples: see docs/real-quality.md).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

from roma_bench.samples import sample_row, write_jsonl
from roma_trainer.data import Sample
from roma_trainer.olmes import available_tasks, load_olmes, olmes_root

# In-set tasks: those where the dense SmolLM2-135M is above chance (PLATFORM.md).
TASKS: tuple[str, ...] = ("arc_easy", "sciq", "piqa", "hellaswag", "socialiqa", "copa")
# Out-of-set tasks: never trained on; the base, CE and RoMA patches are scored on them.
OUT_OF_SET: tuple[str, ...] = ("csqa", "mmlu_high_school_biology")
ROLES: tuple[str, ...] = ("train", "val", "test")  # "train" is the pool, the trainer's name
_SOURCES: dict[str, tuple[str, ...]] = {
    "train": ("train", "validation"),
    "val": ("validation",),
    "test": ("test", "validation"),
}

Loader = Callable[[str, str], list[Sample]]


def olmes_split(task: str, split: str) -> list[Sample]:
    return load_olmes(f"olmes:{task}:{split}")


def olmes_splits(task: str) -> tuple[str, ...]:
    return tuple(available_tasks(olmes_root())[task])


def role_sources(splits: Sequence[str]) -> dict[str, str]:
    """role -> the source split it draws from, for a task that has ``splits``."""
    found = {}
    for role, preferred in _SOURCES.items():
        source = next((s for s in preferred if s in splits), None)
        if source is None:
            raise ValueError(f"no split for {role} among {list(splits)}")
        found[role] = source
    return found


def partition(
    sources: dict[str, list[Sample]], roles: dict[str, str], caps: dict[str, int], seed: str
) -> dict[str, list[Sample]]:
    """Disjoint seeded subsamples, one per role (``roles``: role -> source split name)."""
    shuffled = {}
    for name, samples in sources.items():
        order = list(samples)
        random.Random(f"{seed}/{name}").shuffle(order)
        shuffled[name] = order
    sizes = {}
    for name, order in shuffled.items():
        users = [r for r in ROLES if roles[r] == name]
        wanted = sum(caps[r] for r in users)
        scale = min(1.0, len(order) / wanted) if wanted else 1.0
        sizes |= {r: int(caps[r] * scale) for r in users}
    taken: dict[str, int] = dict.fromkeys(shuffled, 0)
    out = {}
    for role in ROLES:
        name = roles[role]
        out[role] = shuffled[name][taken[name] : taken[name] + sizes[role]]
        taken[name] += sizes[role]
    return out


def write_splits(
    out: Path,
    tasks: Sequence[str],
    caps: dict[str, int],
    seed: int,
    load: Loader = olmes_split,
    splits_of: Callable[[str], Sequence[str]] = olmes_splits,
) -> dict[str, Path]:
    """``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` in ``out``: every task's share."""
    rows: dict[str, list[Sample]] = {role: [] for role in ROLES}
    for task in tasks:
        roles = role_sources(splits_of(task))
        sources = {name: load(task, name) for name in set(roles.values())}
        for role, samples in partition(sources, roles, caps, f"{seed}/{task}").items():
            rows[role] += samples
    return {role: write_jsonl(map(sample_row, rows[role]), out / f"{role}.jsonl") for role in ROLES}


def write_out_of_set(
    out: Path, tasks: Sequence[str], cap: int, seed: int, load: Loader = olmes_split
) -> Path:
    """``out_of_set.jsonl``: up to ``cap`` seeded samples of each task's evaluation split
    (``test`` for MMLU, else ``validation``)."""
    rows: list[Sample] = []
    for task in tasks:
        split = "test" if task.startswith("mmlu_") else "validation"
        samples = list(load(task, split))
        random.Random(f"{seed}/{task}/out-of-set").shuffle(samples)
        rows += samples[:cap]
    return write_jsonl(map(sample_row, rows), out / "out_of_set.jsonl")
