"""How often a Qwen2-MoE's top-k choice is an exact float32 tie, for router weights scaled by
powers of two (which keep the order of the logits, hence the choice in exact arithmetic).

    python benchmarks/router_ties.py --model ~/.cache/roma/models/smollm2-moe \\
        [--task arc_easy] [--samples 30] [--shifts -8,-6,-4,-2,0,2]

Each (prompt, choice) of ``--samples`` seeded OLMES validation samples is run through
transformers with every router multiplied by 2^shift; at each MoE layer and token the routing
probabilities are computed as Qwen2-MoE does (float32 softmax, then top-k) and a tie is counted
when the k-th and (k+1)-th are equal. Tied choices are broken by each library its own way, so a
model with many of them does not serve in vLLM as it scores in transformers (docs/real-model.md).
"""

from __future__ import annotations

import argparse
import os
import random


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--shifts", default="-8,-6,-4,-2,0,2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from roma_trainer.data import load_samples
    from roma_trainer.routers import find_routers
    from roma_trainer.scoring import encode_pairs

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    samples = load_samples(f"olmes:{args.task}:validation")
    samples = random.Random(args.seed).sample(samples, min(args.samples, len(samples)))
    pairs = [(s.prompt, c) for s in samples for c in s.choices]
    enc = encode_pairs(tokenizer, pairs)
    routers = find_routers(model)
    top_k = model.config.num_experts_per_tok
    base = {layer: router.weight.detach().clone() for layer, router in routers.items()}
    count = {"decisions": 0, "ties": 0, "peak": 0.0}

    def hook(module, inputs, _output) -> None:
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        logits = x @ module.weight.T
        top = torch.softmax(logits, dim=-1, dtype=torch.float).topk(top_k + 1, dim=-1).values
        count["decisions"] += len(x)
        count["ties"] += int((top[:, top_k - 1] == top[:, top_k]).sum())
        count["peak"] = max(count["peak"], logits.abs().max().item())

    for router in routers.values():
        router.register_forward_hook(hook)
    print(f"{args.task}, {len(pairs)} (prompt, choice) sequences, top-{top_k}")
    print("| routers | largest abs logit | tied top-k choices per (token, layer) | sequences |")
    print("|---|---|---|---|")
    for shift in (int(s) for s in args.shifts.split(",")):
        count.update(decisions=0, ties=0, peak=0.0)
        tied_sequences = 0
        with torch.no_grad():
            for layer, router in routers.items():
                router.weight.copy_(base[layer] * 2.0**shift)
            for row in range(len(pairs)):
                before = count["ties"]
                length = enc.context_lens[row] + enc.continuation_lens[row]
                model(input_ids=enc.input_ids[row : row + 1, :length])
                tied_sequences += count["ties"] > before
        share = count["ties"] / count["decisions"]
        print(
            f"| built x 2^{shift} | {count['peak']:.2e} | {count['ties']} / "
            f"{count['decisions']} ({100 * share:.2f} %) | {tied_sequences} / {len(pairs)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
