"""How far the routing oracle moves routing on the real benchmark's test split, next to how far
RoMA's neighbours would (``premise_scale.py``): for test samples, the routing at the last prompt
token of the tuned layers before and after the oracle's optimisation (the benchmark's steps, at
the step size it picked): the squared distance, the largest routing weight, and how often the
top-k expert set changes. Reads the benchmark's splits and hidden cache; trains nothing
(docs/real-quality.md, "Why the goals are not met").

    OMP_NUM_THREADS=1 python benchmarks/quality/real/oracle_scale.py --model DIR [--samples N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from roma_bench.oracle import run_oracle
from roma_bench.real.quality import Real, RealConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the benchmark's MoE checkpoint folder")
    parser.add_argument("--out", type=Path, default=Path("results/real"))
    parser.add_argument("--samples", type=int, default=0, help="the first N test samples (0: all)")
    parser.add_argument("--lr", type=float, default=1.0, help="the oracle's step (the one picked)")
    args = parser.parse_args()
    cfg = RealConfig(out=args.out)
    cfg.model = args.model
    bench = Real(cfg)
    model, tok, layers = bench.base_model()
    test = bench.samples["test"][: args.samples or None]
    res = run_oracle(model, tok, test, layers, "last", cfg.oracle_steps, args.lr, cache=bench.cache)
    before, after = res.routing_before, res.routing_after
    assert before is not None and after is not None
    k = model.config.num_experts_per_tok
    d2 = ((after - before) ** 2).sum(-1)  # [samples, layers]
    top_before = before.topk(k, dim=-1).indices.sort(-1).values
    top_after = after.topk(k, dim=-1).indices.sort(-1).values
    changed = (top_before != top_after).any(-1).float()
    n = len(test)
    acc_before, acc_after = 100 * sum(res.correct_before) / n, 100 * sum(res.correct) / n
    print(
        f"oracle on {n} test samples, {cfg.oracle_steps} steps of {args.lr}: accuracy "
        f"{acc_before:.1f} -> {acc_after:.1f}"
    )
    print(
        f"||r_after - r_before||^2 per layer: mean {d2.mean():.2e}, median {d2.median():.2e}, "
        f"max {d2.max():.2e}; top-{k} set changed in {100 * changed.mean():.1f} % of "
        f"(sample, layer); largest routing weight: mean {before.max(-1).values.mean():.4f} "
        f"before, {after.max(-1).values.mean():.4f} after (uniform: {1 / before.shape[-1]:.4f})"
    )


if __name__ == "__main__":
    main()
