"""One benchmark run = train a patch with the trainer's own recipe, then score it on fixed splits.

Training goes through :func:`roma_trainer.recipe.run` with a :class:`TrainConfig`, exactly what
``roma-train train`` does, so the benchmark measures the product and not a re-implementation.
Scoring goes through :func:`roma_trainer.evaluate.evaluate` on one base model kept in memory:
its routers are reset to the base tensors, then the patch is applied (and validated against
them) with :func:`roma_trainer.apply.apply_patch`.

Every finished run is appended to a ledger (``runs.jsonl``) keyed by its full configuration, so
a long benchmark that is interrupted resumes where it stopped instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from roma_bench.results import Accuracy, RunRecord
from roma_patch import read_patch
from roma_trainer.apply import apply_patch, model_routers
from roma_trainer.config import load_config
from roma_trainer.data import Sample
from roma_trainer.evaluate import HFBackend, evaluate
from roma_trainer.hidden_cache import HiddenCache, prefix_fingerprint
from roma_trainer.modeling import load_model
from roma_trainer.recipe import run as train_patch
from roma_trainer.routers import RoutingCapture, find_routers, select_layers
from roma_trainer.scoring import score_samples

log = logging.getLogger("roma_bench")


class Scorer:
    """The base model, loaded once, scoring the base or any patch on fixed sample sets."""

    def __init__(
        self,
        model: str,
        splits: dict[str, Sequence[Sample]],
        batch_size: int = 64,
        hidden_dir: Path | None = None,
    ):
        self.loaded = load_model(model, dtype="auto")
        self.splits = splits
        self.batch_size = batch_size
        self.base = {n: w.detach().clone() for n, w in model_routers(self.loaded.model).items()}
        self.cache = self._hidden_cache(hidden_dir)

    def _hidden_cache(self, folder: Path | None) -> HiddenCache | None:
        """With ``folder``: the states entering the lowest MoE layer, kept there. Every patch
        changes routers at or above that layer only, so the layers below compute the same
        states under every patch; scoring runs the MoE layers alone, on prompts shared by their
        choices, after the first pass (a 30-layer model with 8 MoE layers: about 4x less)."""
        if folder is None:
            return None
        model = self.loaded.model
        first = min(find_routers(model))
        if first < 1:
            return None
        name = f"{prefix_fingerprint(model, first)[:16]}-layer{first}-scorer.safetensors"
        return HiddenCache(model, first, Path(folder) / name)

    def reset(self) -> None:
        with torch.no_grad():
            for name, weight in model_routers(self.loaded.model).items():
                weight.copy_(self.base[name])

    @contextmanager
    def patched(self, patch: str | Path | None) -> Iterator[torch.nn.Module]:
        """The model with ``patch`` applied (the base routers for None), reset afterwards."""
        self.reset()
        try:
            if patch is not None:
                apply_patch(self.loaded.model, patch, self.loaded.model_id)
            yield self.loaded.model
        finally:
            self.reset()

    def score(
        self,
        patch: str | Path | None = None,
        splits: dict[str, Sequence[Sample]] | None = None,
    ) -> dict[str, Accuracy]:
        """Accuracy (raw log-likelihood) on every split (default: the scorer's own), for the
        base or ``patch``."""
        with self.patched(patch) as model:
            scores = accuracies(
                model, self.loaded.tokenizer, splits or self.splits, self.batch_size, self.cache
            )
        if self.cache is not None:
            self.cache.save()
        return scores

    def routing(
        self, samples: list[Sample], patch: str | None, layers_spec: str = "last5"
    ) -> tuple[np.ndarray, list[int]]:
        """Routing weights ``[n, layers, experts]`` at the last prompt token of ``samples``
        under the base routers (``patch=None``) or a patch, and the layers they are of."""
        layers = select_layers(list(find_routers(self.loaded.model)), layers_spec)
        with self.patched(patch) as model, torch.no_grad(), RoutingCapture(model, layers) as cap:
            routing = score_samples(model, self.loaded.tokenizer, samples, "last", cap).routing
        assert routing is not None
        return routing.numpy(), layers


def accuracies(
    model: torch.nn.Module,
    tokenizer: Any,
    splits: dict[str, Sequence[Sample]],
    batch_size: int = 64,
    cache: HiddenCache | None = None,
) -> dict[str, Accuracy]:
    """Accuracy (raw log-likelihood) of any causal LM on every split, by task (the layers
    below ``cache``'s first layer from it, when given)."""
    backend = HFBackend(model, tokenizer, batch_size, cache)
    reports = {name: evaluate(backend, s) for name, s in splits.items()}
    return {
        name: Accuracy(tasks={t: s.acc for t, s in r.tasks.items()}, average=r.average.acc)
        for name, r in reports.items()
    }


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter (name, dtype, bytes): what the model *is*, not where it lives."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# Where the base model lives is not what it is (its weights are in the salt): a ledger stays
# valid for the same model built in another folder or on another machine.
_LOCATION_FIELDS = frozenset({"model"})


@dataclass
class Ledger:
    """Finished runs, one JSON object a line, looked up by the hash of their configuration.

    ``salt`` (the base model's weights fingerprint, and the data's) is part of every key: a
    model or data set regenerated at the same path must not reuse runs of the old one. A line
    is found only under the salt it was written with: its stored key must be its
    configuration's key under this ledger's salt (lines written before keys left out the
    model's folder are recognised by their key over the whole configuration).
    """

    path: Path
    salt: str = ""

    def __post_init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}  # every line, by its stored key
        self._found: dict[str, dict[str, Any]] = {}  # the lines of this salt, by key
        self._read = 0  # bytes of the file read so far
        self._read_new()

    def _read_new(self) -> None:
        """The complete lines appended since the last read (by this process or by another
        worker sharing the file)."""
        if not self.path.exists():
            return
        with self.path.open("rb") as fh:
            fh.seek(self._read)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        self._read += end
        for line in data[:end].decode().splitlines():
            if line.strip():
                record = json.loads(line)
                self.records[record["key"]] = record
                config = record.get("config")
                if config is None:
                    continue
                key = self.key(config)
                if record["key"] in (key, self._hash(config)):
                    self._found[key] = record

    def _hash(self, config: dict[str, Any]) -> str:
        text = json.dumps(config, sort_keys=True) + self.salt
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def key(self, config: dict[str, Any]) -> str:
        return self._hash({k: v for k, v in config.items() if k not in _LOCATION_FIELDS})

    def get(self, config: dict[str, Any]) -> dict[str, Any] | None:
        key = self.key(config)
        if key not in self._found:
            self._read_new()  # another worker may have finished it
        return self._found.get(key)

    def add(self, config: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        record = {"key": self.key(config), "config": config, **result}
        self.records[record["key"]] = self._found[record["key"]] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One unbuffered write with O_APPEND: workers sharing the file never interleave lines.
        with self.path.open("ab", buffering=0) as fh:
            fh.write((json.dumps(record) + "\n").encode())
        return record


class Claims:
    """Which worker is training which run, for workers sharing one ledger (``roma-bench real
    --only``): a file per run being trained, ``claims/<key>`` beside the ledger, made with
    O_EXCL and holding ``host pid``, removed when the run is in the ledger or failed. A claim of
    a process that is gone (same host), or older than ``stale_s`` (a reused pid, a machine that
    went away), is taken over."""

    stale_s = 6 * 3600.0  # a run takes minutes

    def __init__(self, ledger: Ledger) -> None:
        self.dir = ledger.path.parent / "claims"
        self.owner = f"{socket.gethostname()} {os.getpid()}"

    def take(self, key: str) -> bool:
        """True: this worker now trains ``key``; False: a live worker already does."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / key
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._stale(path):
                    return False
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(self.owner)
            return True
        return False

    def release(self, key: str) -> None:
        (self.dir / key).unlink(missing_ok=True)

    def _stale(self, path: Path) -> bool:
        try:
            host, pid = path.read_text().split()
            if time.time() - path.stat().st_mtime > self.stale_s:
                return True
        except (OSError, ValueError):
            return False  # being written, or gone: not ours to judge yet
        if host != socket.gethostname():
            return False  # another machine's: trusted until it is released
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def try_train_and_score(
    scorer: Scorer, ledger: Ledger, train_config: dict[str, Any], patch_dir: Path
) -> RunRecord | None:
    """The run, from the ledger or trained now; None when another worker is training it."""
    cached = ledger.get(train_config)
    if cached is not None:
        return RunRecord.model_validate(cached)
    claims = Claims(ledger)
    key = ledger.key(train_config)
    if not claims.take(key):
        return None
    try:
        if (cached := ledger.get(train_config)) is not None:  # finished while we looked
            return RunRecord.model_validate(cached)
        return _train_and_score(scorer, ledger, train_config, patch_dir)
    finally:
        claims.release(key)


def train_and_score(
    scorer: Scorer,
    ledger: Ledger,
    train_config: dict[str, Any],
    patch_dir: Path,
    poll_s: float = 10.0,
) -> RunRecord:
    """Train one patch with ``train_config`` (TrainConfig fields) and score it; cached. Another
    worker training the same run is waited for (its claim taken over if it dies)."""
    while (record := try_train_and_score(scorer, ledger, train_config, patch_dir)) is None:
        time.sleep(poll_s)
    return record


def _train_and_score(
    scorer: Scorer, ledger: Ledger, train_config: dict[str, Any], patch_dir: Path
) -> RunRecord:
    key = ledger.key(train_config)
    patch_path = patch_dir / f"{key}.safetensors"
    cfg = load_config(None, {**train_config, "out": patch_path})
    started = time.perf_counter()
    train_patch(cfg)
    train_seconds = time.perf_counter() - started
    metrics = read_patch(patch_path).meta.metrics
    scores = scorer.score(patch_path)
    accuracies = " ".join(f"{split} {acc.average:.3f}" for split, acc in scores.items())
    log.info("run %s %s (%.0f s)", key, accuracies, train_seconds)
    record = ledger.add(
        train_config,
        {
            "patch": str(patch_path),
            "train_seconds": round(train_seconds, 1),
            "train_metrics": metrics,
            **{split: acc.model_dump() for split, acc in scores.items()},
        },
    )
    return RunRecord.model_validate(record)


def patch_file(record: RunRecord) -> str:
    """The patch of a ledger run, trained again (same config and seed, same file) when the file
    is gone: patches stay local (.gitignore) while the ledger travels with the repository, so a
    benchmark resumed on another machine re-makes the patches its diagnostics score."""
    if not Path(record.patch).exists():
        log.info("run %s: patch %s is gone, training it again", record.key, record.patch)
        train_patch(load_config(None, {**record.config, "out": record.patch}))
    return record.patch
