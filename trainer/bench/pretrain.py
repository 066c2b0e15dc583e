"""Pretrain the benchmark's tiny OLMoE on the pretraining surface forms of every task domain.

No pretrained MoE can be downloaded here, so the benchmark grows its own: a real OlmoeConfig
(8 layers, 16 experts, top-2, hidden 128, head_dim 64 for vLLM-CPU) and a byte-level BPE trained
on the same text, fitted with plain causal-LM loss plus OLMoE's load-balancing loss on a mixture
of the domains, so that experts specialise by domain. Only the ``pretrain`` templates are used
(``tasks.py``), which leaves the ``adapt``/``val``/``test`` phrasings unseen.

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

import torch

from roma_models.default import BUNDLED
from roma_trainer.bench import tasks

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
    # One intra-op thread: bit-reproducible across machines, and on shared cores far faster than
    # two threads fighting over them (measured: 0.6-0.8 s vs 1.5-5 s a step under load).
    threads: int = 1
    # Batches are cut from a sorted block of this many batches, to pad little.
    bucket: int = 8


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


def _batches(
    stream: Iterator[tuple[str, str]], tokenizer, cfg: PretrainConfig
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of similar-length sequences, in a seeded order."""
    rng = random.Random(cfg.seed)
    while True:
        block = [encode(tokenizer, *next(stream)) for _ in range(cfg.batch_size * cfg.bucket)]
        block.sort(key=len)
        chunks = [block[i : i + cfg.batch_size] for i in range(0, len(block), cfg.batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(chunk):
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            yield {"input_ids": ids, "attention_mask": mask}


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
    batches = _batches(tasks.pretraining_pairs(cfg.seed), tokenizer, cfg)
    started = time.perf_counter()
    history: list[dict[str, float]] = []

    bar = tqdm(range(cfg.steps), desc="pretrain", unit="step")
    for step in bar:
        batch = next(batches)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        output = model(**batch, labels=labels, output_router_logits=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm = float(output.loss - cfg.aux_loss_coef * output.aux_loss)
        bar.set_postfix(lm=f"{lm:.3f}", aux=f"{float(output.aux_loss):.3f}")
        if step % 50 == 0 or step == cfg.steps - 1:
            history.append({"step": step, "lm_loss": lm, "aux_loss": float(output.aux_loss)})

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


if __name__ == "__main__":
    print(repr(check_vllm(BUNDLED)))
