"""The RoMA training recipe: setup(cfg) -> train() -> save_checkpoint() -> cleanup().

Reads top to bottom like nanoGPT's train.py: data, model, success set and neighbours,
optimiser, then the loop (forward -> loss -> backward -> step -> log). Only the tuned routers
require grad (select-then-freeze, as torchtune's ``set_trainable_params``), so autograd never
builds a graph before the first tuned layer and the patch holds nothing but routers.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from roma_patch import PatchMeta, write_patch
from roma_trainer import objectives
from roma_trainer.base_scores import base_scores_path, stored_or_scored
from roma_trainer.config import ConfigError, TrainConfig
from roma_trainer.data import Sample, data_fingerprint, load_samples
from roma_trainer.hidden_cache import HiddenCache, open_hidden_cache
from roma_trainer.modeling import LoadedModel, load_model
from roma_trainer.neighbours import Neighbours, embed, find_neighbours
from roma_trainer.routers import (
    RoutingCapture,
    find_routers,
    freeze_all_but_routers,
    model_routers,
    select_layers,
)
from roma_trainer.scoring import ChoiceScores, score_samples

log = logging.getLogger("roma_trainer.recipe")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batches(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


class RomaRecipe:
    """One training run. Attributes are filled by :meth:`setup` in the order they are needed."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.objective = objectives.get(cfg.objective)
        self.metrics: dict[str, Any] = {}
        self.step = 0
        self.capture: RoutingCapture | None = None
        self.cache: HiddenCache | None = None

    # ----------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)

        # data: validated before the (slow) model load, so bad data fails in a second
        if cfg.data is None:
            raise ConfigError("no training data: pass --data FILE.jsonl (or hf:NAME)")
        self.samples: list[Sample] = load_samples(
            cfg.data, cfg.hf_config, cfg.hf_split, cfg.columns
        )
        self.data_fingerprint = data_fingerprint(self.samples)
        self.answers = torch.tensor([s.answer for s in self.samples])

        # model: select the routers, freeze everything else
        self.loaded: LoadedModel = load_model(
            cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code
        )
        self.model = self.loaded.model
        self.layers = select_layers(list(find_routers(self.model)), cfg.layers)
        self.params = freeze_all_but_routers(self.model, self.layers)
        self.names = list(model_routers(self.model, self.layers))
        self.base_params = [p.detach().clone() for p in self.params]
        self.capture = RoutingCapture(self.model, self.layers)
        self.capture.__enter__()
        # layers below the first tuned one never change: their output comes from this cache
        self.cache = open_hidden_cache(
            cfg.hidden_cache,
            self.model,
            self.layers[0],
            self.loaded.tokenizer,
            self.samples,
            cfg.hidden_cache_dir,
        )

        # success set S (the base model answers correctly) and base routing r_j of its members;
        # the same for every run of a sweep, so stored beside a disk cache's hidden states, with
        # the routing whatever this objective needs (so one file serves every objective)
        stored_at = self.base_scores_path()
        base, self.base_stored = stored_or_scored(
            stored_at,
            self.objective.neighbours,
            lambda: self.score_all(with_routing=self.objective.neighbours or bool(stored_at)),
        )
        if self.cache is not None:
            self.cache.save()  # disk mode: later runs on this model and data skip the prefix
            log.info("hidden cache %s", self.cache.describe())
        correct = (base.logprob.argmax(-1) == self.answers).tolist()
        self.success = [i for i, ok in enumerate(correct) if ok]
        self.metrics.update(
            train_acc_before=sum(correct) / len(correct),
            train_ce_before=objectives.choice_cross_entropy(base.logprob, self.answers).item(),
            success_set_size=len(self.success),
            num_samples=len(self.samples),
        )

        # neighbours N(i) in S by prompt embedding (for the objectives that read them)
        self.neighbours: Neighbours | None = None
        if self.objective.neighbours:
            assert base.routing is not None
            self.success_routing = base.routing.flatten(1)[self.success].detach()
            emb = embed([s.prompt for s in self.samples], cfg.embedder, cfg.embed_batch_size)
            self.neighbours = find_neighbours(
                emb, self.success, cfg.neighbours, cfg.k, cfg.eps, cfg.sigma, cfg.seed
            )
            counts = self.neighbours.count().float()
            if not self.success:
                log.warning(
                    "the base model answers no training sample correctly: S is empty, "
                    "so the neighbour term is 0 and this run is plain CE"
                )
            self.metrics.update(
                sigma=self.neighbours.sigma,
                mean_neighbours=counts.mean().item(),
                samples_without_neighbours=int((counts == 0).sum()),
            )
            if self.success and (counts == 0).float().mean() > 0.5:
                log.warning(
                    "%d of %d samples have no neighbour in S (neighbours=%s, eps=%g): their "
                    "manifold term is 0 and they train on the CE alone; a larger --eps or "
                    "knn reaches further",
                    int((counts == 0).sum()), len(counts), cfg.neighbours, cfg.eps,
                )  # fmt: skip
        log.info("setup %s", " ".join(f"{k}={v}" for k, v in self.metrics.items()))

        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = math.ceil(len(self.samples) / cfg.batch_size)
        self.total_steps = cfg.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)

    def base_scores_path(self) -> Path | None:
        """Where a disk-mode cache keeps the pool's base scores; None without one, or while its
        hidden states are not on disk yet (scoring the pool is what writes them)."""
        cache = self.cache
        if cache is None or cache.path is None or not cache.path.is_file():
            return None
        return base_scores_path(
            cache.path.parent,
            self.model,
            self.data_fingerprint,
            self.layers,
            self.cfg.token,
            self.cfg.batch_size,
        )

    @torch.no_grad()
    def score_all(self, with_routing: bool) -> ChoiceScores:
        """Score every sample (and capture its routing) under the current routers."""
        parts = [
            score_samples(
                self.model,
                self.loaded.tokenizer,
                [self.samples[i] for i in idx],
                self.cfg.token,
                self.capture if with_routing else None,
                self.cache,
            )
            for idx in batches(len(self.samples), self.cfg.batch_size)
        ]
        width = max(p.logprob.shape[1] for p in parts)

        def pad(t: torch.Tensor) -> torch.Tensor:  # absent choices score -inf
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=float("-inf"))

        return ChoiceScores(
            logprob=torch.cat([pad(p.logprob) for p in parts]).cpu(),
            routing=torch.cat([p.routing for p in parts]).cpu() if with_routing else None,
        )

    # ----------------------------------------------------------------------------- loss
    def lam_at(self, step: int) -> float:
        """Linear warm-up: lam * min(1, (step + 1) / lam_warmup_steps)."""
        warmup = self.cfg.lam_warmup_steps
        return self.cfg.lam * (1.0 if warmup == 0 else min(1.0, (step + 1) / warmup))

    def live_routing(self, nb_index: torch.Tensor) -> torch.Tensor:
        """Routing ``[B, K, D]`` of success-set members ``nb_index`` under the routers being
        trained, with gradient. The routed token is in the prompt, so one choice per sample
        is enough (causal attention: the choices never reach it)."""
        members, slot = torch.unique(nb_index, return_inverse=True)  # each member scored once
        batch = [self.samples[self.success[m]] for m in members.tolist()]
        batch = [Sample(s.task, s.prompt, s.choices[:1], 0) for s in batch]
        routing = score_samples(
            self.model, self.loaded.tokenizer, batch, self.cfg.token, self.capture, self.cache
        ).routing
        assert routing is not None
        return routing.flatten(1)[slot]

    def loss(self, idx: Sequence[int], lam: float) -> tuple[torch.Tensor, dict[str, float]]:
        """CE + lam * the objective's term for the samples ``idx``; see roma_trainer.objectives."""
        objective = self.objective
        batch = [self.samples[i] for i in idx]
        capture = self.capture if objective.routing else None
        scores = score_samples(
            self.model, self.loaded.tokenizer, batch, self.cfg.token, capture, self.cache
        )
        answers = self.answers[list(idx)].to(scores.logprob.device)
        ce = objectives.choice_cross_entropy(scores.logprob, answers)
        if objective.term is None:
            reg = torch.zeros((), device=ce.device)
        else:
            reg = objective.term(self.terms(idx, scores.routing, ce.device))
        loss = ce + lam * reg
        return loss, {"loss": loss.item(), "ce": ce.item(), "reg": reg.item(), "lam": lam}

    def terms(
        self, idx: Sequence[int], routing: torch.Tensor | None, device: torch.device
    ) -> objectives.Terms:
        """What the objective's term reads for the samples ``idx``: the routers, and the
        routing and neighbours when it asked for them."""
        live = self.cfg.neighbour_routing == "live"
        nb_routing = nb_weights = None
        if self.objective.neighbours:
            assert self.neighbours is not None
            nb_index = self.neighbours.index[list(idx)].clamp_min(0)
            nb_weights = self.neighbours.weight[list(idx)].to(device)
            routed = self.live_routing(nb_index) if live else self.success_routing[nb_index]
            nb_routing = routed.to(device)
        return objectives.Terms(
            self.objective.name, self.params, self.base_params, routing, nb_routing, nb_weights,
            neighbours_live=live,
        )  # fmt: skip

    # ----------------------------------------------------------------------------- train
    def train(self) -> None:
        cfg = self.cfg
        generator = torch.Generator().manual_seed(cfg.seed)
        self.model.train(False)  # eval-mode numerics (no dropout) while training the routers
        progress = tqdm(total=self.total_steps, desc=f"roma {cfg.objective}", unit="step")
        history: list[dict[str, float]] = []
        while self.step < self.total_steps:
            order = torch.randperm(len(self.samples), generator=generator).tolist()
            for idx in batches(len(order), cfg.batch_size):
                if self.step >= self.total_steps:
                    break
                loss, parts = self.loss([order[i] for i in idx], self.lam_at(self.step))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                self.optimizer.step()
                self.step += 1
                history.append(parts)
                progress.set_postfix({k: f"{v:.4f}" for k, v in parts.items()})
                progress.update(1)
                log.debug(
                    "step=%d %s", self.step, " ".join(f"{k}={v:.6f}" for k, v in parts.items())
                )
        progress.close()

        after = self.score_all(with_routing=False)
        self.metrics.update(
            steps=self.step,
            first_loss=history[0]["loss"] if history else None,
            last_loss=history[-1]["loss"] if history else None,
            train_acc_after=(after.logprob.argmax(-1) == self.answers).float().mean().item(),
            train_ce_after=objectives.choice_cross_entropy(after.logprob, self.answers).item(),
        )
        log.info("trained %s", " ".join(f"{k}={v}" for k, v in self.metrics.items()))

    # ----------------------------------------------------------------------------- output
    def router_tensors(self) -> dict[str, torch.Tensor]:
        """The tuned routers in the checkpoint's dtype, named as in the checkpoint."""
        dtype = self.loaded.checkpoint_dtype
        return {
            n: p.detach().to("cpu", dtype[n]) for n, p in zip(self.names, self.params, strict=True)
        }

    def save_checkpoint(self, out: str | Path | None = None) -> Path:
        """Write the router patch; returns its path."""
        path = Path(out or self.cfg.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        hparams = self.cfg.model_dump(
            mode="json",
            exclude={"model", "data", "out", "trust_remote_code", "hidden_cache_dir"},
        )
        meta = PatchMeta(
            base_model=self.loaded.model_id,
            base_fingerprint=self.loaded.base.fingerprint(self.names),
            layers=self.layers,
            objective=self.cfg.objective,
            hparams=hparams,
            data_fingerprint=self.data_fingerprint,
            metrics=self.metrics,
        )
        write_patch(self.router_tensors(), meta, path)
        log.info("wrote patch path=%s layers=%s", path, self.layers)
        return path

    def cleanup(self) -> None:
        """Remove the capture hooks (the model may be used afterwards, e.g. in tests)."""
        if self.capture is not None:
            self.capture.__exit__(None, None, None)
            self.capture = None


def run(cfg: TrainConfig) -> Path:
    """setup -> train -> save_checkpoint -> cleanup; returns the patch path."""
    recipe = RomaRecipe(cfg)
    try:
        recipe.setup()
        recipe.train()
        return recipe.save_checkpoint()
    finally:
        recipe.cleanup()
