"""How far RoMA's premise moves routing on the real benchmark's test split: for each test sample,
the kernel-weighted mean routing of its 3 nearest successful neighbours (and of 3 random
successful samples) against its own, at the last prompt token of the tuned layers: the squared
distance and how often the top-k expert set changes. Reads the benchmark's splits and hidden
cache; trains nothing (docs/real-quality.md, "Progress").

    OMP_NUM_THREADS=1 python benchmarks/quality/real/premise_scale.py --model DIR [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from roma_bench.oracle import neighbour_routing_targets, pool_routing
from roma_bench.real.quality import Real, RealConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the benchmark's MoE checkpoint folder")
    parser.add_argument("--out", type=Path, default=Path("results/real"))
    args = parser.parse_args()
    cfg = RealConfig(out=args.out)
    cfg.model = args.model
    bench = Real(cfg)
    model, tok, layers = bench.base_model()
    pool, test = bench.samples["train"], bench.samples["test"]
    routing, correct = bench.pool_routing
    own, _ = pool_routing(model, tok, test, layers, cache=bench.cache)
    k = model.config.num_experts_per_tok
    targets = neighbour_routing_targets(
        pool, routing, correct, test, ("knn", "random"), 3, cfg.data_seed
    )
    for mode, (target, _) in targets.items():
        d2 = ((target - own) ** 2).sum(-1)  # [samples, layers]
        top_own = own.topk(k, dim=-1).indices.sort(-1).values
        top_target = target.topk(k, dim=-1).indices.sort(-1).values
        changed = (top_own != top_target).any(-1).float()
        print(
            f"{mode}: ||r_target - r_own||^2 per layer mean {d2.mean():.2e} max {d2.max():.2e}; "
            f"top-{k} set changed in {100 * changed.mean():.1f} % of (sample, layer); routing "
            f"weights in [{own.min():.4f}, {own.max():.4f}] (own), "
            f"[{target.min():.4f}, {target.max():.4f}] (target)"
        )


if __name__ == "__main__":
    main()
