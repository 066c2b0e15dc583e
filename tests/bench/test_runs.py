"""The benchmark's run ledger: a re-run reuses finished runs, but never those of another model."""

from __future__ import annotations

import time

import torch

from roma_bench.runs import Ledger, weights_fingerprint


def test_ledger_persists_and_keys_by_model_weights(tmp_path) -> None:
    config = {"objective": "manifold", "lr": 0.01, "seed": 0}
    ledger = Ledger(tmp_path / "runs.jsonl", salt="model-a")
    ledger.add(config, {"val": 0.5})

    again = Ledger(tmp_path / "runs.jsonl", salt="model-a")
    assert again.get(config)["val"] == 0.5
    assert again.get({**config, "seed": 1}) is None
    assert Ledger(tmp_path / "runs.jsonl", salt="model-b").get(config) is None


def test_ledger_keys_leave_out_the_models_folder(tmp_path) -> None:
    """The same model (same salt) built in another folder finds its runs, written before or
    after keys left the folder out; a line of another salt is never found."""
    import hashlib
    import json

    config = {"model": "/old/place/model", "objective": "ce", "lr": 1e-5, "seed": 0}
    moved = {**config, "model": "/new/place/model"}
    ledger = Ledger(tmp_path / "runs.jsonl", salt="model-a")
    ledger.add(config, {"val": 0.5})
    assert Ledger(tmp_path / "runs.jsonl", salt="model-a").get(moved)["val"] == 0.5
    assert Ledger(tmp_path / "runs.jsonl", salt="model-b").get(moved) is None

    # A line as written before: its key hashed the whole configuration, folder included.
    legacy = {**config, "seed": 1}
    old_key = hashlib.sha256((json.dumps(legacy, sort_keys=True) + "model-a").encode())
    line = {"key": old_key.hexdigest()[:16], "config": legacy, "val": 0.25}
    with (tmp_path / "runs.jsonl").open("a") as fh:
        fh.write(json.dumps(line) + "\n")
    reread = Ledger(tmp_path / "runs.jsonl", salt="model-a")
    assert reread.get({**moved, "seed": 1})["val"] == 0.25
    assert Ledger(tmp_path / "runs.jsonl", salt="model-b").get({**moved, "seed": 1}) is None
    assert len(reread.records) == 2  # every line, for tools that list them all


def test_workers_sharing_a_ledger_see_each_others_runs(tmp_path) -> None:
    """A ledger opened before another worker added a run finds it; a line still being
    written is left for the next read."""
    path = tmp_path / "runs.jsonl"
    mine, theirs = Ledger(path, salt="m"), Ledger(path, salt="m")
    theirs.add({"objective": "l2", "seed": 0}, {"val": 0.75})
    assert mine.get({"objective": "l2", "seed": 0})["val"] == 0.75
    with path.open("a") as fh:
        fh.write('{"key": "half a li')
    assert mine.get({"objective": "l2", "seed": 1}) is None
    with path.open("a") as fh:
        fh.write('ne"}\n')
    theirs.add({"objective": "l2", "seed": 1}, {"val": 0.5})
    assert mine.get({"objective": "l2", "seed": 1})["val"] == 0.5


def test_a_run_another_worker_trains_is_waited_for_not_trained_twice(tmp_path) -> None:
    """Claims: a run claimed by a live worker is not trained here (``try_train_and_score``
    says None; ``train_and_score`` waits for its line); a dead worker's claim is taken over; a
    claim from another machine is trusted."""
    import os
    import socket
    import subprocess
    import sys
    import threading

    from roma_bench.runs import Claims, train_and_score, try_train_and_score

    ledger = Ledger(tmp_path / "runs.jsonl", salt="m")
    config = {"objective": "ce", "lr": 1e-5, "seed": 0}
    key = ledger.key(config)
    claims = Claims(ledger)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (claims.dir).mkdir(parents=True)
        (claims.dir / key).write_text(f"{socket.gethostname()} {other.pid}")
        # No scorer is needed: nothing is trained while the other worker holds the run.
        assert try_train_and_score(None, ledger, config, tmp_path) is None  # type: ignore[arg-type]
        assert not claims.take(key)

        def other_finishes() -> None:
            val = {"tasks": {"t": 0.5}, "average": 0.5}
            record = {"patch": "p", "train_seconds": 1.0, "train_metrics": {}, "val": val}
            Ledger(tmp_path / "runs.jsonl", salt="m").add(config, record)
            claims.release(key)

        threading.Timer(0.3, other_finishes).start()
        waited = train_and_score(None, ledger, config, tmp_path, poll_s=0.05)  # type: ignore[arg-type]
        assert waited.key == key and waited.train_seconds == 1.0
    finally:
        other.kill()
        other.wait()

    # The other worker died holding a run: its claim is taken over.
    (claims.dir / "dead").write_text(f"{socket.gethostname()} {other.pid}")
    assert claims.take("dead") and (claims.dir / "dead").read_text() == claims.owner
    claims.release("dead")
    assert not (claims.dir / "dead").exists()
    # Another machine's claim: trusted (its process cannot be checked from here).
    (claims.dir / "far").write_text(f"another-host-{os.getpid()} 1")
    assert not claims.take("far")
    # ... until it is older than any run takes.
    old = time.time() - Claims.stale_s - 60
    os.utime(claims.dir / "far", (old, old))
    assert claims.take("far")


def test_weights_fingerprint_sees_every_parameter() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    before = weights_fingerprint(model)
    assert weights_fingerprint(model) == before
    with torch.no_grad():
        model[1].bias[0] += 1e-6
    assert weights_fingerprint(model) != before


def test_scorer_with_hidden_cache_scores_as_without(tmp_path, tiny_models) -> None:
    """The scorer's cache of the states below the lowest MoE layer gives the uncached scores,
    for the base routers and for a patch (routers change above it only), and is kept on disk
    for the next scorer."""
    from roma_bench.runs import Scorer
    from roma_trainer.data import load_samples
    from tests.fixtures.engine import patch_bytes

    model_dir = tiny_models["qwen2_moe"]  # a dense layer 0 below the MoE layers, as SmolLM2-MoE
    samples = {"s": load_samples("trainer/data/sample.jsonl")[:12]}
    patch = tmp_path / "patch.safetensors"
    patch.write_bytes(patch_bytes(model_dir, scale=4.0, seed=7))
    plain = Scorer(str(model_dir), samples)
    cached = Scorer(str(model_dir), samples, hidden_dir=tmp_path / "hidden")
    assert cached.cache is not None and cached.cache.first_layer >= 1
    for p in (None, patch):
        with plain.patched(p) as model:
            want = plain_scores = _logprobs(model, plain, samples["s"], None)
        with cached.patched(p) as model:
            got = _logprobs(model, cached, samples["s"], cached.cache)
        assert torch.allclose(got, want, atol=1e-4), (p, (got - want).abs().max())
        assert cached.score(p) == plain.score(p)
    assert plain_scores is not None
    [saved] = (tmp_path / "hidden").glob("*.safetensors")
    again = Scorer(str(model_dir), samples, hidden_dir=tmp_path / "hidden")
    assert again.cache is not None and again.cache.n_tokens == cached.cache.n_tokens > 0
    assert again.score(patch) == plain.score(patch)
    assert saved.exists()


def _logprobs(model, scorer, samples, cache) -> torch.Tensor:
    from roma_trainer.evaluate import HFBackend

    backend = HFBackend(model, scorer.loaded.tokenizer, 16, cache)
    pairs = [(s.prompt, c) for s in samples for c in s.choices]
    return torch.tensor([r.logprob for r in backend.loglikelihood(pairs)])
