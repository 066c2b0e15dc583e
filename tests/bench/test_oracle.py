"""The routing oracle: a zero delta is the base model, optimising it lowers the gold loss, and
nothing of the model changes."""

from __future__ import annotations

import torch

from roma_bench.oracle import run_oracle
from roma_bench.synthetic import tasks
from roma_trainer.data import Sample
from roma_trainer.evaluate import HFBackend, evaluate
from roma_trainer.modeling import load_model
from roma_trainer.routers import find_routers, select_layers


def samples(n: int = 2) -> list[Sample]:
    return [
        Sample(s["task"], s["prompt"], tuple(s["choices"]), s["answer"])
        for s in tasks.generate("test", n, seed=0)
    ]


def test_oracle_starts_at_base_and_lowers_the_gold_loss(tiny_olmoe) -> None:
    loaded = load_model(tiny_olmoe, "float32")
    model, tok = loaded.model, loaded.tokenizer
    data = samples(7)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = [p.requires_grad for p in model.parameters()]
    layers = select_layers(list(find_routers(model)), "last5")

    result = run_oracle(model, tok, data, layers, "last", steps=8, lr=1.0, batch_size=5)

    # With a zero delta the hooked forward is the plain model: same decisions as evaluation.
    report = evaluate(HFBackend(model, tok), data)
    base_correct = sum(s.acc * s.n for s in report.tasks.values())
    assert sum(result.correct_before) == round(base_correct)
    assert result.gold_nll_after < result.gold_nll_before  # equal if the delta never acted
    assert sum(result.correct) >= sum(result.correct_before)
    # The routing it reports starting from is the base routing at that token, in sample order
    # across batches (batch_size 5 < 7 samples), and it ends elsewhere.
    from roma_bench.oracle import pool_routing

    base, _ = pool_routing(model, tok, data, layers)
    assert result.routing_before is not None and result.routing_after is not None
    torch.testing.assert_close(result.routing_before, base, atol=1e-5, rtol=1e-4)
    assert result.routing_after.shape == base.shape
    assert not torch.allclose(result.routing_after, base, atol=1e-3)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    assert [p.requires_grad for p in model.parameters()] == flags


def test_oracle_moves_only_the_chosen_token(tiny_olmoe) -> None:
    """The delta acts at the chosen token: optimising the first prompt token's routing and the
    last one's start from the same base forward and end at different optima."""
    loaded = load_model(tiny_olmoe, "float32")
    data = samples(1)
    layers = select_layers(list(find_routers(loaded.model)), "last2")
    last = run_oracle(loaded.model, loaded.tokenizer, data, layers, "last", steps=4, lr=1.0)
    first = run_oracle(loaded.model, loaded.tokenizer, data, layers, "first", steps=4, lr=1.0)
    assert last.gold_nll_before == first.gold_nll_before  # same base forward
    assert last.gold_nll_after != first.gold_nll_after


def test_routing_transplant_with_the_base_routing_is_the_base_model(tiny_olmoe) -> None:
    """Setting the routing to what the base routers give changes nothing, and the per-task
    success-set means are the means of the correctly answered samples' base routing."""
    from roma_bench.oracle import correct_with_routing, success_routing_by_task
    from roma_trainer.routers import RoutingCapture
    from roma_trainer.scoring import score_samples

    loaded = load_model(tiny_olmoe, "float32")
    model, tok = loaded.model, loaded.tokenizer
    data = samples(3)
    layers = select_layers(list(find_routers(model)), "last2")
    with torch.no_grad(), RoutingCapture(model, layers) as capture:
        base = score_samples(model, tok, data, "last", capture)
    assert base.routing is not None
    base_correct = [int(lp.argmax()) == s.answer for lp, s in zip(base.logprob, data, strict=True)]

    assert correct_with_routing(model, tok, data, layers, base.routing) == base_correct

    means = success_routing_by_task(model, tok, data, layers)
    answered = {s.task for s, ok in zip(data, base_correct, strict=True) if ok}
    assert set(means) == {s.task for s in data}  # a task without successes: see below
    for task in answered:
        rows = [
            i
            for i, (s, ok) in enumerate(zip(data, base_correct, strict=True))
            if ok and s.task == task
        ]
        assert torch.allclose(means[task], base.routing[rows].mean(0), atol=1e-6)


def test_shared_oracle_starts_at_its_init_and_lowers_the_tasks_gold_loss(tiny_olmoe) -> None:
    """The task-shared routing oracle: before any step it is the routing transplant of its
    init (the same scores as correct_with_routing), and its steps lower the gold NLL."""
    from roma_bench.oracle import correct_with_routing, run_shared_oracle

    loaded = load_model(tiny_olmoe, "float32")
    model, tok = loaded.model, loaded.tokenizer
    data = samples(4)
    layers = select_layers(list(find_routers(model)), "last2")
    n_experts = find_routers(model)[layers[0]].weight.shape[0]
    # A different, non-uniform start per task, so that a mix-up of tasks would show.
    gen = torch.Generator().manual_seed(0)
    init = {
        t: torch.rand(len(layers), n_experts, generator=gen).softmax(-1)
        for t in sorted({s.task for s in data})
    }
    targets = torch.stack([init[s.task] for s in data])
    transplant = correct_with_routing(model, tok, data, layers, targets)

    weights = [p.detach().clone() for p in model.parameters()]
    trainable = [p.requires_grad for p in model.parameters()]
    result = run_shared_oracle(
        model, tok, data, layers, init, "last", steps=10, lr=0.5, batch_size=3
    )
    assert result.correct_before == transplant
    assert result.gold_nll_after < result.gold_nll_before
    # Only the shared routing moved: the weights and their requires_grad flags are as before.
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters(), strict=True))
    assert [p.requires_grad for p in model.parameters()] == trainable


def test_success_routing_covers_a_task_the_base_never_answers(tiny_olmoe) -> None:
    """Identical choices make the base pick choice 0: a task whose gold is 1 has an empty
    success set and starts from the mean routing of all its pool samples instead."""
    from roma_bench.oracle import success_routing_by_task
    from roma_trainer.routers import RoutingCapture
    from roma_trainer.scoring import score_samples

    loaded = load_model(tiny_olmoe, "float32")
    model, tok = loaded.model, loaded.tokenizer
    layers = select_layers(list(find_routers(model)), "last2")
    prompts = ["one two", "three four five", "six"]
    pool = [Sample("hit", p, (" a", " a"), 0) for p in prompts[:2]]
    pool += [Sample("miss", p, (" a", " a"), 1) for p in prompts]
    means = success_routing_by_task(model, tok, pool, layers)
    assert set(means) == {"hit", "miss"}
    with torch.no_grad(), RoutingCapture(model, layers) as capture:
        routing = score_samples(model, tok, pool, "last", capture).routing
    torch.testing.assert_close(means["hit"], routing[:2].mean(0))
    torch.testing.assert_close(means["miss"], routing[2:].mean(0))


def test_oracles_read_the_hidden_cache_as_the_full_model(tiny_models) -> None:
    """With the states below the MoE layers from a cache (a packed forward: one prompt, its
    choices after it), the oracle, the routing transplant and the task-shared oracle find what
    the full model finds."""
    from roma_bench.oracle import correct_with_routing, run_shared_oracle, success_routing_by_task
    from roma_trainer.hidden_cache import HiddenCache

    loaded = load_model(tiny_models["qwen2_moe"], "float32")  # a dense layer 0
    model, tok = loaded.model, loaded.tokenizer
    data = samples(1)
    routers = find_routers(model)
    layers = list(routers)
    cache = HiddenCache(model, min(routers))
    for token in ("last", "first"):
        plain = run_oracle(model, tok, data, layers, token, steps=4, lr=5.0)
        cached = run_oracle(model, tok, data, layers, token, steps=4, lr=5.0, cache=cache)
        moved = plain.gold_nll_before - plain.gold_nll_after
        assert moved > 1e-3  # the delta acted
        assert abs(cached.gold_nll_before - plain.gold_nll_before) < 1e-4
        # float noise of the two forwards is ~1e-5; a delta at the wrong rows moves it elsewhere
        assert abs(cached.gold_nll_after - plain.gold_nll_after) < 0.05 * moved
        assert cached.correct == plain.correct
    means = success_routing_by_task(model, tok, data, layers)
    targets = torch.stack([means[s.task] for s in data])
    plain_t = correct_with_routing(model, tok, data, layers, targets)
    assert correct_with_routing(model, tok, data, layers, targets, cache=cache) == plain_t
    plain_s = run_shared_oracle(model, tok, data, layers, means, steps=3, lr=0.3)
    cached_s = run_shared_oracle(model, tok, data, layers, means, steps=3, lr=0.3, cache=cache)
    assert abs(cached_s.gold_nll_after - plain_s.gold_nll_after) < 1e-3
    assert cache.n_tokens > 0


def test_neighbour_routing_targets_are_the_weighted_routing_of_successful_neighbours() -> None:
    """With the real MiniLM: a sample asked about with a pool member's own prompt has that
    member as its nearest neighbour (k=1: exactly its routing), failed pool samples never
    contribute, and with k=3 every target is a mixture of successful members' routings."""
    from roma_bench.oracle import neighbour_routing_targets

    prompts = [
        "The capital of France is",
        "Water boils at a temperature of",
        "The largest planet in our solar system is",
        "Photosynthesis happens in the",
    ]
    pool = [Sample("t", p, (" a", " b"), 0) for p in prompts]
    gen = torch.Generator().manual_seed(0)
    routing = torch.softmax(torch.randn(4, 2, 8, generator=gen), dim=-1)  # [n, layers, experts]
    correct = [True, True, False, True]  # member 2 failed: never a neighbour
    asked = [pool[1], pool[2], Sample("t", "What is the capital city of France?", (" x",), 0)]

    one, _ = neighbour_routing_targets(pool, routing, correct, asked, ("knn",), 1, 0)["knn"]
    assert torch.equal(one[0], routing[1])
    assert torch.equal(one[2], routing[0])  # France's capital, reworded
    assert not any(torch.equal(one[i], routing[2]) for i in range(3))

    three, sigma = neighbour_routing_targets(pool, routing, correct, asked, ("knn",), 3, 0)["knn"]
    assert sigma > 0
    assert torch.allclose(three.sum(dim=-1), torch.ones(3, 2))
    # Member 2 never weighs in: each target is a mixture of members 0, 1 and 3 alone.
    members = routing[[0, 1, 3]].reshape(3, -1)
    for target in three.reshape(3, -1):
        weights = torch.linalg.lstsq(members.T, target[:, None]).solution.squeeze(1)
        assert torch.allclose(members.T @ weights, target, atol=1e-5)
        assert weights.min() > -1e-5 and abs(float(weights.sum()) - 1) < 1e-4
