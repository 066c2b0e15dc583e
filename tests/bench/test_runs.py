"""The benchmark's run ledger: a re-run reuses finished runs, but never those of another model."""

from __future__ import annotations

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


def test_weights_fingerprint_sees_every_parameter() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    before = weights_fingerprint(model)
    assert weights_fingerprint(model) == before
    with torch.no_grad():
        model[1].bias[0] += 1e-6
    assert weights_fingerprint(model) != before
