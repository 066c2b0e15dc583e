"""Choice log-likelihoods: documented tokenization, batched scores equal one-by-one full
forwards, token positions, and accuracy from the lm-eval-style backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from roma_trainer.data import Sample
from roma_trainer.evaluate import HFBackend, evaluate
from roma_trainer.scoring import Encoded, encode_pairs, score_encoded, score_samples, token_position

PAIRS = [
    ("Question: what is 2 + 3?\nAnswer:", " 5"),
    ("Question: what is 2 + 3?\nAnswer:", " fifty-five"),
    ("The sky is", " blue"),
    ("Paris", " is the capital of France."),
]


@pytest.fixture(scope="module")
def olmoe(tiny_models: dict[str, Path]):
    path = tiny_models["olmoe"]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def reference_logprob(model, ids: list[int], n_cont: int) -> float:
    """Full forward of one unpadded sequence through the whole CausalLM, logits of every token."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    start = len(ids) - n_cont
    return sum(logprobs[t - 1, ids[t]].item() for t in range(start, len(ids)))


def test_tokenization_is_context_then_continuation_separately(olmoe) -> None:
    _, tok = olmoe
    enc = encode_pairs(tok, PAIRS)
    for i, (ctx, cont) in enumerate(PAIRS):
        expected = tok(ctx).input_ids + tok(cont, add_special_tokens=False).input_ids
        assert enc.input_ids[i, : len(expected)].tolist() == expected
        assert enc.attention_mask[i].sum().item() == len(expected)
        assert enc.context_lens[i] == len(tok(ctx).input_ids)
        assert enc.continuation_lens[i] == len(tok(cont, add_special_tokens=False).input_ids)


def test_batched_scores_equal_unpadded_full_forward(tiny_model: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    enc = encode_pairs(tok, PAIRS)
    with torch.no_grad():
        scores = score_encoded(model, enc)
    for i in range(len(PAIRS)):
        n = int(enc.attention_mask[i].sum())
        ids = enc.input_ids[i, :n].tolist()
        expected = reference_logprob(model, ids, enc.continuation_lens[i])
        assert scores.logprob[i].item() == pytest.approx(expected, abs=1e-4)
    assert scores.n_tokens.tolist() == enc.continuation_lens


def test_left_truncation_keeps_the_continuation(olmoe) -> None:
    _, tok = olmoe
    enc = encode_pairs(tok, [("word " * 50, " end")], max_length=12)
    cont = tok(" end", add_special_tokens=False).input_ids
    assert enc.input_ids.shape[1] == 12
    assert enc.input_ids[0, -len(cont) :].tolist() == cont
    with pytest.raises(ValueError, match="alone exceeds"):
        encode_pairs(tok, [("a", " b" * 40)], max_length=8)


def test_token_positions_skip_leading_special_tokens() -> None:
    enc = Encoded(torch.zeros(1, 9, dtype=torch.long), torch.ones(1, 9), [7], [2], [1])
    assert token_position(enc, 0, "first") == 1  # token 0 is BOS
    assert token_position(enc, 0, "last") == 6
    assert token_position(enc, 0, "middle") == 3
    with pytest.raises(ValueError, match="last, first or middle"):
        token_position(enc, 0, "end")


def test_score_samples_pads_ragged_choices_with_minus_inf(olmoe) -> None:
    model, tok = olmoe
    samples = [
        Sample("a", PAIRS[0][0], (" 5", " 6", " 7"), 0),
        Sample("b", "The sky is", (" blue", " green"), 0),
    ]
    with torch.no_grad():
        scores = score_samples(model, tok, samples)
    assert scores.logprob.shape == (2, 3)
    assert scores.logprob[1, 2] == float("-inf")
    assert torch.isfinite(scores.logprob[0]).all()
    choice = tok(" 6", add_special_tokens=False).input_ids
    ref = reference_logprob(model, tok(PAIRS[0][0]).input_ids + choice, len(choice))
    assert scores.logprob[0, 1].item() == pytest.approx(ref, abs=1e-4)


def test_evaluate_counts_argmax_choices_per_task(olmoe) -> None:
    model, tok = olmoe
    backend = HFBackend(model, tok, batch_size=3)
    probe = [Sample("t1", "The sky is", (" blue", " green", " red"), 0)]
    scored = backend.loglikelihood([(probe[0].prompt, c) for c in probe[0].choices])
    best = max(range(3), key=lambda c: scored[c].logprob)
    best_norm = max(range(3), key=lambda c: scored[c].logprob / scored[c].n_tokens)
    samples = [
        Sample("t1", "The sky is", (" blue", " green", " red"), best),
        Sample("t1", "The sky is", (" blue", " green", " red"), (best + 1) % 3),
        Sample("t2", "The sky is", (" blue", " green", " red"), best_norm),
    ]
    report = evaluate(backend, samples)
    assert report.tasks["t1"].n == 2
    assert report.tasks["t1"].acc == 0.5
    assert report.tasks["t2"].acc_norm == 1.0
    assert report.average.acc == pytest.approx((0.5 + report.tasks["t2"].acc) / 2)
    assert set(report.to_json()) == {"tasks", "average"}
