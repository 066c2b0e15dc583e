"""The training pool scored under the base routers, kept beside the hidden-state cache.

Every run's setup scores the whole pool with the base routers: the success set S, the CE before
training and, for the objectives that read neighbours, the base routing of S's members. That
pass is the same for every run of a sweep on one model, pool and setting (lr, lambda, seed and
objective do not enter it), and on a 135M model with the last 5 layers tuned it is about a
minute of each ~8-minute run. In ``hidden_cache: disk`` mode it is stored once, next to the
hidden states, under a name made of everything the scores depend on: every weight of the model
(routers and LM head included), its config, the pool, the tuned layers, the routing token, the
scoring batch size and the dtype. A run that finds the file reads it instead of scoring.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from torch import nn

from roma_trainer.hidden_cache import read_tensors, weights_fingerprint, write_tensors
from roma_trainer.scoring import ChoiceScores

log = logging.getLogger("roma_trainer.base_scores")

FILE_FORMAT = "roma-base-scores/1"


def base_scores_path(
    folder: Path,
    model: nn.Module,
    data: str,
    layers: list[int],
    token: str,
    batch_size: int,
) -> Path:
    """Where the base scores of this model, pool (``data``: its fingerprint) and setting live."""
    key = {
        "model": weights_fingerprint(model),
        "data": data,
        "layers": layers,
        "token": token,
        "batch_size": batch_size,
        "dtype": str(next(model.parameters()).dtype),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return folder / f"{digest[:32]}-base-scores.safetensors"


def load_base_scores(path: Path, with_routing: bool) -> ChoiceScores | None:
    """The scores stored at ``path``, or None when there are none, they lack the routing that
    is asked for, or the file is not one :func:`save_base_scores` wrote (then it is rewritten)."""
    if not path.is_file():
        return None
    stored = read_tensors(path, FILE_FORMAT, "base scores")
    if stored is None or (with_routing and "routing" not in stored):
        return None
    log.info("base scores loaded path=%s", path)
    return ChoiceScores(logprob=stored["logprob"], routing=stored.get("routing"))


def save_base_scores(path: Path, scores: ChoiceScores) -> None:
    """Write ``scores`` to ``path`` atomically (a run reading it never sees half a file)."""
    tensors = {"logprob": scores.logprob.contiguous()}
    if scores.routing is not None:
        tensors["routing"] = scores.routing.contiguous()
    write_tensors(path, tensors, {"format": FILE_FORMAT})
    log.info("base scores saved path=%s", path)


def stored_or_scored(
    path: Path | None, with_routing: bool, score: Callable[[], ChoiceScores]
) -> tuple[ChoiceScores, bool]:
    """The stored scores at ``path`` if they serve, else ``score()`` (stored when ``path`` is
    set); and whether they came from the file."""
    found = load_base_scores(path, with_routing) if path is not None else None
    if found is not None:
        return found, True
    scores = score()
    if path is not None:
        save_base_scores(path, scores)
    return scores, False
