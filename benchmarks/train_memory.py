"""Router-only (RoMA) training versus full fine-tuning of the same model and batch: peak memory
and step time, side by side in one run.

    python benchmarks/train_memory.py                       # ~110M-parameter OLMoE, 3 steps
    python benchmarks/train_memory.py --hidden 768 --experts 16 --layers 8   # ~240M

How memory is measured, and why this way: each mode runs in its own fresh subprocess (so one
mode's freed-but-cached memory cannot flatter the other), builds the same randomly initialised
model from the same config and seed, and runs the same loss (choice cross-entropy + lambda x
the manifold term on the last 5 MoE layers) on the same batch. Just before the first step it
resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``), so
"peak" is the true resident high-water mark of the process during training: weights, gradients,
AdamW state, activations and allocator overhead, everything the OS had to provide. tracemalloc
cannot see torch's allocations and torch has no CPU allocator statistics, so RSS is the honest
number here. "train overhead" is peak minus the RSS right before the first step (the model and
data already loaded), i.e. what training itself added. Step time is the median of the timed
steps after one warm-up step (which also allocates the optimiser state). Linux only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLES = Path(__file__).parents[1] / "trainer" / "data" / "sample.jsonl"


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args: argparse.Namespace) -> None:
    """One mode, in its own process; prints one JSON line."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from roma_models.tiny import build_tokenizer, tiny_config
    from roma_trainer import objectives
    from roma_trainer.data import load_jsonl
    from roma_trainer.routers import (
        RoutingCapture,
        find_routers,
        freeze_all_but_routers,
        select_layers,
    )
    from roma_trainer.scoring import score_samples

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(tmp))
    config = tiny_config(
        "olmoe",
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_experts=args.experts,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    n_params = sum(p.numel() for p in model.parameters())
    layers = select_layers(list(find_routers(model)), "last5")
    if args.worker == "router":
        params = freeze_all_but_routers(model, layers)
    else:
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
    n_trainable = sum(p.numel() for p in params)
    samples = load_jsonl(SAMPLES)[: args.batch_size]
    answers = torch.tensor([s.answer for s in samples])
    capture = RoutingCapture(model, layers).__enter__()
    with torch.no_grad():  # neighbours: the next sample's routing under the base routers
        base = score_samples(model, tokenizer, samples, "last", capture).routing.flatten(1)
    neighbours, weights = base.roll(1, 0)[:, None, :], torch.ones(len(samples), 1)
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    gc.collect()
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        scores = score_samples(model, tokenizer, samples, "last", capture)
        loss = objectives.choice_cross_entropy(
            scores.logprob, answers
        ) + 0.5 * objectives.manifold_term(scores.routing.flatten(1), neighbours, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    peak = rss_kib("VmHWM")
    print(
        json.dumps(
            {
                "mode": args.worker,
                "params": n_params,
                "trainable": n_trainable,
                "rss_before_mib": before / 1024,
                "peak_mib": peak / 1024,
                "overhead_mib": (peak - before) / 1024,
                "step_s": statistics.median(times[1:]),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=512, help="per-expert FFN width")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8, help="samples (all their choices)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--worker", choices=["router", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from rich.console import Console
    from rich.table import Table

    results = {}
    for mode in ("router", "full"):
        cmd = [sys.executable, __file__, "--worker", mode] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "worker"
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{mode} worker failed:\n{done.stderr[-3000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    r, f = results["router"], results["full"]
    table = Table(
        title=f"OLMoE {r['params'] / 1e6:.0f}M params (hidden {args.hidden}, {args.layers} layers, "
        f"{args.experts} experts), batch {args.batch_size} samples, {args.steps} timed steps"
    )
    for column in ("", "router-only (RoMA)", "full fine-tune", "router / full"):
        table.add_column(column, justify="right")
    table.add_row(
        "trainable params",
        f"{r['trainable']:,}",
        f"{f['trainable']:,}",
        f"{r['trainable'] / f['trainable']:.5f}",
    )
    rows = (("peak_mib", "peak RSS (MiB)", ".1f"), ("overhead_mib", "train overhead (MiB)", ".1f"),
            ("step_s", "step time (s)", ".3f"))  # fmt: skip
    for key, label, fmt in rows:
        table.add_row(label, format(r[key], fmt), format(f[key], fmt), f"{r[key] / f[key]:.2f}x")
    table.add_row(
        "RSS before step 1 (MiB)", f"{r['rss_before_mib']:.1f}", f"{f['rss_before_mib']:.1f}", ""
    )
    Console().print(table)


if __name__ == "__main__":
    main()
