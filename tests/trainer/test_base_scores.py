"""The pool's base scores kept beside the hidden-state cache: read back exactly, ignored (and
rewritten) when damaged or missing what a run needs, scored only when nothing serves."""

from __future__ import annotations

from pathlib import Path

import torch

from roma_trainer.base_scores import load_base_scores, save_base_scores, stored_or_scored
from roma_trainer.scoring import ChoiceScores


def _scores(routing: bool) -> ChoiceScores:
    logprob = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -3.0, -4.0]])
    return ChoiceScores(logprob=logprob, routing=torch.rand(2, 5, 16) if routing else None)


def test_stored_scores_read_back_exactly(tmp_path: Path) -> None:
    path = tmp_path / "s-base-scores.safetensors"
    scores = _scores(routing=True)
    save_base_scores(path, scores)
    found = load_base_scores(path, with_routing=True)
    assert found is not None and found.routing is not None and scores.routing is not None
    assert torch.equal(found.logprob, scores.logprob)  # -inf (an absent choice) included
    assert torch.equal(found.routing, scores.routing)
    assert not list(tmp_path.glob("*.partial"))


def test_scores_without_routing_do_not_serve_a_run_that_needs_it(tmp_path: Path) -> None:
    path = tmp_path / "s-base-scores.safetensors"
    save_base_scores(path, _scores(routing=False))
    assert load_base_scores(path, with_routing=False) is not None
    calls: list[int] = []

    def score() -> ChoiceScores:
        calls.append(1)
        return _scores(routing=True)

    found, stored = stored_or_scored(path, True, score)
    assert not stored and calls == [1] and found.routing is not None
    # Scored again with the routing, so the next run that needs it reads it.
    found, stored = stored_or_scored(path, True, score)
    assert stored and calls == [1]


def test_a_damaged_file_is_ignored_and_replaced(tmp_path: Path, caplog) -> None:
    path = tmp_path / "s-base-scores.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert load_base_scores(path, with_routing=False) is None
    assert "ignored" in caplog.text
    _, stored = stored_or_scored(path, False, lambda: _scores(routing=False))
    assert not stored
    assert load_base_scores(path, with_routing=False) is not None


def test_without_a_path_nothing_is_stored(tmp_path: Path) -> None:
    found, stored = stored_or_scored(None, False, lambda: _scores(routing=False))
    assert not stored and found.logprob.shape == (2, 3)
    assert not list(tmp_path.iterdir())
