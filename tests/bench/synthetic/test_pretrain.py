"""Pretraining the benchmark model: deterministic, and the result is a loadable MoE checkpoint
whose training text is tokenized exactly as the trainer scores it."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from roma_bench.synthetic.pretrain import (
    FORCE_BIAS,
    DomainForcing,
    PretrainConfig,
    build_model,
    domain_experts,
    encode,
    pretrain,
    specialisation_loss,
)
from roma_trainer.modeling import load_model
from roma_trainer.routers import find_routers


def tiny(out) -> PretrainConfig:
    return PretrainConfig(
        out=out,
        steps=3,
        warmup=1,
        batch_size=8,
        bucket=2,
        layers=2,
        experts=4,
        hidden_size=64,
        intermediate_size=32,
        vocab_size=400,
    )


def test_pretraining_is_deterministic_and_loads(tmp_path) -> None:
    a = pretrain(tiny(tmp_path / "a"))
    b = pretrain(tiny(tmp_path / "b"))
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys()
    assert all((ta[k] == tb[k]).all() for k in ta)
    loaded = load_model(a, "float32")
    assert list(find_routers(loaded.model)) == [0, 1]
    assert loaded.model.config.num_experts == 4
    assert (a / "pretrain.json").exists()


def test_pretraining_sequences_match_the_trainer_tokenization(tmp_path) -> None:
    from roma_trainer.scoring import encode_pairs

    path = pretrain(tiny(tmp_path / "m"))
    tok = load_model(path, "float32").tokenizer
    prompt, answer = "Add 3 and 4. Answer:", "7"
    enc = encode_pairs(tok, [(prompt, answer)])
    ids = encode(tok, prompt, answer)
    assert ids[:-1] == enc.input_ids[0].tolist()
    assert ids[-1] == tok.eos_token_id


def test_each_domain_owns_its_experts_and_the_loss_asks_for_them() -> None:
    groups = [domain_experts(d, 8, 16) for d in range(8)]
    assert groups[0] == [0, 1] and groups[7] == [14, 15]
    assert sorted(e for g in groups for e in g) == list(range(16))  # a partition
    assert domain_experts(5, 8, 4) == [1]  # fewer experts than domains: shared round-robin

    selected = torch.tensor([True, True, False])
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, [2, 3]] = True
    uniform = (torch.zeros(3, 16),)
    # Uniform routing puts 2/16 of the weight on the group: loss = log 8.
    assert specialisation_loss(uniform, selected, mask).item() == pytest.approx(math.log(8))
    peaked = torch.full((3, 16), -30.0)
    peaked[:, 2] = 10.0
    assert specialisation_loss((peaked, peaked), selected, mask).item() < 1e-6
    # Tokens not selected do not count, and nothing selected is a zero loss.
    peaked[2, :] = 0.0
    assert specialisation_loss((peaked,), selected, mask).item() < 1e-6
    assert specialisation_loss(uniform, torch.zeros(3, dtype=torch.bool), mask).item() == 0.0


def test_forcing_runs_the_domain_experts_only_where_asked() -> None:
    cfg = PretrainConfig(layers=3, experts=4, hidden_size=64, intermediate_size=32)
    model = build_model(cfg, vocab_size=50)
    forcing = DomainForcing(model, first_layer=1)
    first, routed = forcing.routers[0], forcing.routers[1]
    assert "forward" not in vars(first) and "forward" in vars(routed)  # layer 0 left alone
    torch.manual_seed(0)
    with torch.no_grad():
        routed.weight.normal_()
        hidden = torch.randn(3, 64)
        plain = hidden @ routed.weight.T
        group = [2, 3] if set(plain[0].topk(2).indices.tolist()) != {2, 3} else [0, 1]
        bias = torch.zeros(3, 4)
        bias[0, group] = FORCE_BIAS
        forcing.set(bias)
        _, weights, index = routed(hidden)
    assert sorted(index[0].tolist()) == group  # forced: not what the router would pick
    assert weights[0].sum().item() == pytest.approx(1.0, abs=1e-4)
    assert index[1:].sort(-1).values.tolist() == plain[1:].topk(2).indices.sort(-1).values.tolist()
    # the specialisation loss sees the router's own logits, not the forced ones
    assert torch.allclose(forcing.free_logits[0], plain, atol=1e-5)
    forcing.set(None)
    with torch.no_grad():
        _, _, index = routed(hidden)
    assert index.sort(-1).values.tolist() == plain.topk(2).indices.sort(-1).values.tolist()


def test_read_rows_are_forced_but_left_out_of_the_router_teaching(tmp_path) -> None:
    from transformers import AutoTokenizer

    from roma_bench.synthetic import tasks
    from roma_bench.synthetic.pretrain import _batches
    from roma_models.tiny import build_tokenizer

    cfg = PretrainConfig(batch_size=16, bucket=2, experts=16, read_share=0.5)
    build_tokenizer(tmp_path, tasks.tokenizer_corpus(0, n=200), 400)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    stream = tasks.pretraining_pairs(0, cfg.read_share)
    rows = [next(stream) for _ in range(cfg.batch_size * cfg.bucket)]
    batch = next(_batches(iter(rows), tok, cfg))
    assert batch["taught"].any() and (batch["specialise"] & ~batch["taught"]).any()
    # every forced token of a read row is untaught, every one of a pretraining row taught
    by_row = batch["specialise"].view(cfg.batch_size, -1), batch["taught"].view(cfg.batch_size, -1)
    read_rows = {tuple(tok(p).input_ids) for p, a, d, taught in rows if a and not taught}
    for ids, forced, taught in zip(batch["input_ids"], *by_row, strict=True):
        if not forced.any():  # a background sentence
            assert not taught.any()
            continue
        n_prompt = int(forced.nonzero()[0]) + 1  # forcing starts at the last prompt token
        is_read = tuple(ids[:n_prompt].tolist()) in read_rows
        assert bool(taught[forced].all()) is not is_read
        assert bool(taught[forced].any()) is not is_read
