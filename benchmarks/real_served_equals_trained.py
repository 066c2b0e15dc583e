"""Served equals trained on the MoEfied SmolLM2: a router patch pushed to the real gateway gives
the same per-choice log-likelihoods (and accuracy) as transformers offline with that patch.

    python benchmarks/real_served_equals_trained.py --model ~/.cache/roma/models/smollm2-moe \\
        [--task arc_easy] [--samples 30] [--patch FILE] [--json results/real/served.json]

``roma-serve`` (gateway, vLLM-CPU engine and a local Redis) is started on the checkpoint as a
child process with its own ``ROMA_CACHE_DIR`` (a temporary folder). Every (prompt, choice) of
``--samples`` seeded OLMES validation samples is scored through the gateway's completions API
(``roma_trainer.evaluate_remote``: token ids in, ``echo`` + ``logprobs``) on the base routers,
then again after the patch is POSTed to ``/routers`` with the trainer's push client. The server
is then stopped and the same requests are scored offline by transformers
(``roma_trainer.evaluate.HFBackend``), before and after ``roma_trainer.apply.apply_patch``.

Without ``--patch`` the patch is the base routers of the last ``--layers`` MoE layers plus
Gaussian noise (``--scale`` times each router's standard deviation): nothing is trained, but
routing, hence every score above the first patched layer, changes. CI runs it on 8 samples with
a freshly trained RoMA patch (tests/bench/real/test_real_model_served.py), and its tiny-model
version (tests/service/test_served_equals_trained.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

TOLERANCE = 1e-3  # issue 14: per-choice log-likelihoods equal within this


def perturbed_patch(model_dir: Path, layers: int, scale: float, seed: int) -> bytes:
    """A patch of the last ``layers`` routers: base + ``scale`` * std * N(0, 1)."""
    import torch

    from roma_patch import (
        BaseRouters,
        PatchMeta,
        read_checkpoint_routers,
        router_layer,
        write_patch,
    )

    raw = read_checkpoint_routers(model_dir)
    names = sorted(raw, key=router_layer)[-layers:]
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in names:
        base = raw[name].to_torch()
        noise = torch.randn(base.shape, generator=generator, dtype=base.dtype)
        tensors[name] = base + scale * base.std() * noise
    meta = PatchMeta(
        base_model=str(model_dir),
        base_fingerprint=BaseRouters.from_raw(str(model_dir), raw).fingerprint(names),
        layers=sorted(router_layer(n) for n in names),
        objective="perturbation",
        hparams={"scale": scale, "seed": seed},
    )
    return write_patch(tensors, meta)


class Server:
    """``roma-serve`` as a child process in its own session, on loopback."""

    def __init__(self, model_dir: Path, state: Path, token: str) -> None:
        from roma_service.engine.process import free_port

        self.port = free_port("127.0.0.1")
        self.log_path = state / "roma-serve.log"
        env = os.environ | {
            "ROMA_CACHE_DIR": str(state),
            "ROMA_ADMIN_TOKEN": token,
            "HF_HUB_OFFLINE": "1",
        }
        command = [sys.executable, "-m", "roma_service.cli", "--model", str(model_dir)]
        command += ["--port", str(self.port), "--max-model-len", "2048"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                # process_group: killpg ends the engine too; our session (docs/engine.md).
                command,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 900.0) -> float:
        began = time.perf_counter()
        while time.perf_counter() - began < timeout_s:
            if self.proc.poll() is not None:
                raise SystemExit(f"roma-serve exited ({self.proc.returncode}); see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=5.0).status_code == 200:
                    return time.perf_counter() - began
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"roma-serve not ready in {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM: roma-serve stops its engine and Redis itself; the group only if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def compare(served: Sequence, offline: Sequence) -> dict[str, float]:
    gaps = [abs(a.logprob - b.logprob) for a, b in zip(served, offline, strict=True)]
    return {
        "max_abs_dlogprob": max(gaps),
        "median_abs_dlogprob": statistics.median(gaps),
        "choices_over_tolerance": sum(g > TOLERANCE for g in gaps),
        "choices": len(gaps),
    }


def accuracy(results: Sequence, samples: Sequence) -> float:
    """``roma_trainer.evaluate``'s acc, from scores already computed."""
    from roma_trainer.evaluate import LoglikelihoodBackend, evaluate

    class Replay(LoglikelihoodBackend):
        def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list:
            assert len(requests) == len(results)
            return list(results)

    return 100 * evaluate(Replay(), samples).average.acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a built checkpoint folder")
    parser.add_argument("--task", default="arc_easy", help="an OLMES task (validation split)")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--patch", type=Path, help="a patch file (default: a perturbation)")
    parser.add_argument("--layers", type=int, default=5, help="perturbed: the last N routers")
    parser.add_argument("--scale", type=float, default=0.5, help="perturbed: noise / std")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from roma_trainer.apply import apply_patch
    from roma_trainer.data import load_samples
    from roma_trainer.evaluate import HFBackend
    from roma_trainer.evaluate_remote import CompletionsBackend
    from roma_trainer.push import push_patch

    samples = load_samples(f"olmes:{args.task}:validation")
    samples = random.Random(args.seed).sample(samples, min(args.samples, len(samples)))
    requests = [(s.prompt, c) for s in samples for c in s.choices]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    patch = (
        args.patch.read_bytes()
        if args.patch
        else perturbed_patch(args.model, args.layers, args.scale, args.seed)
    )

    token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="roma-served-") as state:
        server = Server(args.model, Path(state), token)
        try:
            startup = server.wait_ready()
            print(f"roma-serve ready after {startup:.0f} s", flush=True)
            backend = CompletionsBackend(server.url, tokenizer)
            began = time.perf_counter()
            served = {"base": backend.loglikelihood(requests)}
            patch_file = Path(state) / "patch.safetensors"
            patch_file.write_bytes(patch)
            answer = push_patch(patch_file, server.url, token)
            backend.router_versions.clear()
            served["patched"] = backend.loglikelihood(requests)
            served_s = time.perf_counter() - began
            if backend.router_versions != {str(answer["version"])}:
                raise SystemExit(f"served by {backend.router_versions}, pushed {answer}")
            backend.close()
        finally:
            server.stop()

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    began = time.perf_counter()
    offline = {"base": HFBackend(model, tokenizer).loglikelihood(requests)}
    apply_patch(model, patch, str(args.model))
    offline["patched"] = HFBackend(model, tokenizer).loglikelihood(requests)
    offline_s = time.perf_counter() - began

    rows = {
        routers: {
            "served_acc": accuracy(served[routers], samples),
            "offline_acc": accuracy(offline[routers], samples),
            **compare(served[routers], offline[routers]),
        }
        for routers in ("base", "patched")
    }
    moved = max(
        abs(a.logprob - b.logprob) for a, b in zip(offline["base"], offline["patched"], strict=True)
    )
    lines = [
        f"{args.task}, {len(samples)} validation samples ({len(requests)} choices); "
        f"patch: {args.patch or f'last {args.layers} routers + {args.scale} x std noise'}",
        "| routers | served acc | offline acc | max abs d logprob | median | "
        f"choices over {TOLERANCE:g} |",
        "|---|---|---|---|---|---|",
    ]
    for routers, row in rows.items():
        lines.append(
            f"| {routers} | {row['served_acc']:.1f} | {row['offline_acc']:.1f} | "
            f"{row['max_abs_dlogprob']:.2e} | {row['median_abs_dlogprob']:.2e} | "
            f"{row['choices_over_tolerance']} / {row['choices']} |"
        )
    lines.append(f"The patch moved offline log-probs by up to {moved:.2f} (it is in effect).")
    lines.append(
        f"Start-up {startup:.0f} s; scoring through the gateway {served_s:.0f} s (both "
        f"router versions), offline {offline_s:.0f} s."
    )
    print("\n".join(lines))
    if args.json:
        figures = {
            "task": args.task,
            "samples": len(samples),
            "rows": rows,
            "patch_moved_max": moved,
            "startup_s": startup,
            "served_s": served_s,
            "offline_s": offline_s,
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
