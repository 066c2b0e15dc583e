"""MoEfied SmolLM2 against the dense model: accuracy per task, side by side in one run.

    python benchmarks/moefication.py            # the variant grid of docs/real-model.md
    python benchmarks/moefication.py --variants 8/512/16/4,5/0/16/4
    python benchmarks/moefication.py --model ~/.cache/roma/models/smollm2-moe   # a built one

A variant is ``moe_layers/shared_size/num_experts/top_k``, optionally with ``:initial`` (the
router left at its initialisation, the mean gate row of each expert) or ``:random`` (random
router rows: how much routing matters). Each is built in memory exactly as ``roma-models build
smollm2-moe`` builds it (same calibration text, same fit), then scored on
the validation split of each task (``--samples`` per task, a seeded random subset) with the
trainer's log-likelihood scoring (``roma_trainer.evaluate``): ``acc`` picks the choice with the
highest summed log-prob. With ``--model`` the checkpoint is also scored with every expert on,
which must equal the dense model.

Speed: the layers below the lowest MoE layer are the dense model's in every variant, so their
output is computed once, in the dense run, and fed to each variant's upper layers
(``--dense-cache FILE`` keeps it for the next run).

The summary column "kept" is the mean over tasks of (acc - chance) for the variant divided by
the same mean for the dense model (chance = mean of 1 / number of choices).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

TASKS = ("arc_easy", "sciq", "piqa", "hellaswag", "socialiqa", "copa")
GRID = (
    "5/0/16/4,5/0/16/8,5/512/16/4,8/512/16/4,8/512/16/2,8/512/32/4,8/768/16/4,8/384/16/4,"
    "10/512/16/4,8/256/16/8"
)


def parse_variant(text: str):  # -> (MoeShape, router)
    from roma_models.moefy import MoeShape

    cut, _, router = text.partition(":")
    layers, shared, experts, top_k = (int(part) for part in cut.split("/"))
    if router not in ("", "initial", "random"):
        raise SystemExit(f"variant {text!r}: the router is :initial or :random")
    shape = MoeShape(moe_layers=layers, shared_size=shared, num_experts=experts, top_k=top_k)
    return shape, router or "trained"


def task_samples(count: int, seed: int) -> list:
    from roma_trainer.data import load_samples

    chosen = []
    for task in TASKS:
        samples = load_samples(f"olmes:{task}:validation")
        chosen += random.Random(seed).sample(samples, min(count, len(samples)))
    return chosen


def run(args: argparse.Namespace) -> dict:
    import torch
    from torch import nn

    from roma_models.moe_build import calibrate, moefy
    from roma_models.moefy import router_scale
    from roma_models.smollm2 import load_dense
    from roma_trainer.evaluate import (
        HFBackend,
        LoglikelihoodBackend,
        LoglikelihoodResult,
        evaluate,
    )
    from roma_trainer.routers import find_routers
    from roma_trainer.scoring import encode_pairs, max_length, score_encoded

    class CachedPrefix(nn.Module):
        """Stands in for the decoder layers below ``start``: returns their output, computed
        once by the dense model for the same batch."""

        def __init__(self) -> None:
            super().__init__()
            self.hidden: torch.Tensor | None = None

        def forward(self, hidden_states: torch.Tensor, **_: object) -> torch.Tensor:
            assert self.hidden is not None and self.hidden.shape == hidden_states.shape
            return self.hidden

    class PrefixBackend(LoglikelihoodBackend):
        """Scores batches as HFBackend does, the lower layers' output taken from ``cache``."""

        def __init__(self, model: nn.Module, tokenizer, start: int, cache: list) -> None:
            self.model, self.tokenizer, self.cache = model, tokenizer, cache
            self.prefix = CachedPrefix()
            layers = model.model.layers
            model.model.layers = nn.ModuleList([self.prefix, *layers[start:]])

        @torch.no_grad()
        def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list:
            out = []
            for index, begin in enumerate(range(0, len(requests), args.batch_size)):
                chunk = requests[begin : begin + args.batch_size]
                self.prefix.hidden = self.cache[index]
                enc = encode_pairs(self.tokenizer, chunk, max_length(self.model))
                scores = score_encoded(self.model, enc)
                out += [
                    LoglikelihoodResult(float(lp), int(n), bool(g))
                    for lp, n, g in zip(
                        scores.logprob, scores.n_tokens, scores.is_greedy, strict=True
                    )
                ]
            return out

    torch.manual_seed(0)
    dense, tokenizer = load_dense()
    samples = task_samples(args.samples, args.seed)
    chance = {
        task: sum(1 / len(s.choices) for s in samples if s.task == task)
        / sum(1 for s in samples if s.task == task)
        for task in TASKS
    }
    variants = [parse_variant(v) for v in args.variants.split(",")] if not args.model else []
    if args.model:
        config = json.loads((Path(args.model) / "config.json").read_text())
        start = min(set(range(config["num_hidden_layers"])) - set(config["mlp_only_layers"]))
    else:
        start = min(dense.config.num_hidden_layers - s.moe_layers for s, _ in variants)

    class Recording(LoglikelihoodBackend):
        """Keeps the log-likelihoods ``evaluate`` asked for, to compare variants per request."""

        def __init__(self, inner: LoglikelihoodBackend) -> None:
            self.inner, self.results = inner, []

        def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list:
            self.results = self.inner.loglikelihood(requests)
            return self.results

    results, logprobs, seconds = {}, {}, {}
    gap: dict[str, float] | None = None  # all experts on vs dense, with --model

    def score(name: str, backend: LoglikelihoodBackend) -> None:
        began = time.perf_counter()
        recording = Recording(backend)
        results[name] = evaluate(recording, samples)
        logprobs[name] = torch.tensor([r.logprob for r in recording.results], dtype=torch.float64)
        seconds[name] = time.perf_counter() - began
        print(f"{name}: {seconds[name]:.0f} s", flush=True)

    class Replay(LoglikelihoodBackend):
        """The dense run's results, read back from ``--dense-cache``."""

        def __init__(self, rows: torch.Tensor) -> None:
            self.rows = rows

        def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list:
            assert len(requests) == len(self.rows)
            return [LoglikelihoodResult(float(a), int(b), bool(c)) for a, b, c in self.rows]

    key = [args.samples, args.seed, start, args.batch_size]
    saved = args.dense_cache and args.dense_cache.exists()
    stored = torch.load(args.dense_cache, weights_only=True) if saved else None
    if stored is not None and stored["key"] == key:
        cache = stored["hidden"]
        score("dense", Replay(stored["results"]))
    else:
        cache = []
        hook = dense.model.layers[start - 1].register_forward_hook(
            lambda _m, _a, out: cache.append(out[0] if isinstance(out, tuple) else out)
        )
        recording = Recording(HFBackend(dense, tokenizer, args.batch_size))
        score("dense", recording)
        hook.remove()
        if args.dense_cache:
            rows = torch.tensor(
                [[r.logprob, r.n_tokens, r.is_greedy] for r in recording.results],
                dtype=torch.float64,
            )
            torch.save({"key": key, "hidden": cache, "results": rows}, args.dense_cache)

    if args.model:
        from transformers import AutoModelForCausalLM

        for name in (f"top-{config['num_experts_per_tok']} (built)", "all experts on"):
            moe = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
            if name == "all experts on":
                for router in find_routers(moe).values():
                    router.top_k = router.num_experts
            score(name, PrefixBackend(moe, tokenizer, start, cache))
        diff = (logprobs["all experts on"] - logprobs["dense"]).abs()
        gap = {"max": float(diff.max()), "median": float(diff.median())}
        print(
            "all experts on vs dense, per (prompt, choice) log-prob: "
            f"max |d| {gap['max']:.2e}, median {gap['median']:.2e}"
        )
    else:
        deepest = replace(variants[0][0], moe_layers=dense.config.num_hidden_layers - start)
        layers = deepest.layers(dense.config.num_hidden_layers)
        calibration = calibrate(dense, tokenizer, layers, seed=args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        for shape, router in variants:
            steps = 0 if router == "initial" else 1000
            moe, _ = moefy(dense, shape, calibration, seed=args.seed, train_steps=steps)
            if router == "random":
                with torch.no_grad():  # scaled as built: p_e ~ 1/E, only the order is random
                    for layer, gate in find_routers(moe).items():
                        random_rows = torch.randn(gate.weight.shape, generator=generator)
                        scale = router_scale(random_rows, calibration.inputs[layer])
                        gate.weight.copy_(random_rows * scale)
            name = f"{shape.moe_layers}/{shape.shared_size}/{shape.num_experts}/{shape.top_k}"
            name += "" if router == "trained" else f" {router}"
            score(name, PrefixBackend(moe.eval(), tokenizer, start, cache))

    table: dict[str, dict[str, float]] = {}
    dense_above = sum(results["dense"].tasks[t].acc - chance[t] for t in TASKS) / len(TASKS)
    for name, report in results.items():
        row = {t: 100 * report.tasks[t].acc for t in TASKS}
        above = sum(report.tasks[t].acc - chance[t] for t in TASKS) / len(TASKS)
        row["avg"] = sum(row[t] for t in TASKS) / len(TASKS)
        row["kept"] = 100 * above / dense_above
        table[name] = row
    return {
        "variants": table,
        "chance": {t: 100 * chance[t] for t in TASKS},
        "samples": {t: sum(1 for s in samples if s.task == t) for t in TASKS},
        "all_experts_vs_dense_abs_dlogprob": gap,
        "seconds": seconds,
    }


def render(result: dict) -> str:
    """One row per variant, one column per task (acc %), then the average and "kept"."""
    table, samples = result["variants"], result["samples"]
    head = ["variant (layers/shared/experts/k)", *TASKS, "avg", "kept %"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        "| samples | " + " | ".join(str(samples[t]) for t in TASKS) + " | | |",
        "| chance | " + " | ".join(f"{result['chance'][t]:.1f}" for t in TASKS) + " | | |",
    ]
    for name, row in table.items():
        cells = [f"{row[t]:.1f}" for t in TASKS] + [f"{row['avg']:.1f}", f"{row['kept']:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "acc (%): 0-shot, the choice with the highest summed log-prob, on a seeded random "
        "subset of each task's validation split. kept % = mean over tasks of (acc - chance) "
        "for the variant / the same for dense."
    )
    if gap := result["all_experts_vs_dense_abs_dlogprob"]:
        lines.append(
            "All experts on vs dense, per (prompt, choice) summed log-prob: "
            f"max |d| {gap['max']:.2e}, median {gap['median']:.2e}."
        )
    timing = ", ".join(
        f"{name} {sec:.0f} s" if sec >= 1 else f"{name} replayed from --dense-cache"
        for name, sec in result["seconds"].items()
    )
    lines.append(f"Scoring time: {timing}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=GRID, help="comma-separated layers/shared/E/k")
    parser.add_argument("--model", help="score this built checkpoint instead of variants")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--markdown", type=Path, help="also write the table here (default: --json's .md)"
    )
    parser.add_argument(
        "--dense-cache",
        type=Path,
        help="keep the dense run (lower layers' output and scores, ~1 GB) in this file and "
        "reuse it when samples, seed, batch size and lowest MoE layer match",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    text = render(result)
    print(text)
    command = "python " + shlex.join(["benchmarks/moefication.py", *sys.argv[1:]])
    result["command"] = command
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    markdown = args.markdown or (args.json.with_suffix(".md") if args.json else None)
    if markdown:
        markdown.write_text(f"# MoEfied SmolLM2 vs dense\n\n    {command}\n\n{text}\n")


if __name__ == "__main__":
    main()
