"""MoEfication on a tiny dense Llama: the checkpoint's layout, all experts on == dense, and the
pieces (balanced k-means, router fit) on problems whose answer is known."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from roma_models.moe_build import Calibration, calibrate, moefy
from roma_models.moefy import ROUTER_LOGIT_BOUND_LOG2, MoeShape, balanced_kmeans
from roma_models.router_fit import ExpertGram, best_experts, fit_router, top_k_mask
from roma_models.tiny import build_tokenizer
from roma_trainer.routers import find_routers

SHAPE = MoeShape(moe_layers=2, shared_size=32, num_experts=6, top_k=2)
LAYERS = 4
# A chat template, so the calibration's chat prompts render (SmolLM2's own has the same roles).
TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer_dir = build_tokenizer(folder)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a larger init than HF's 0.02, so the FFNs matter to the output
        for name, param in model.named_parameters():
            if name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")):
                param.normal_(0.0, 0.2)
    return model, tokenizer


@pytest.fixture(scope="module")
def built(dense, tmp_path_factory: pytest.TempPathFactory):
    model, tokenizer = dense
    calibration = calibrate(
        model, tokenizer, SHAPE.layers(LAYERS), new_tokens=12, samples_per_prompt=1
    )
    with torch.no_grad():
        moe, reports = moefy(model, SHAPE, calibration, train_steps=20)
    out = tmp_path_factory.mktemp("tiny-moe")
    moe.save_pretrained(out)
    return moe, reports, out, calibration


def logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)


def test_checkpoint_layout(built) -> None:
    moe, _, out, _ = built
    config = AutoConfig.from_pretrained(out)
    assert config.architectures == ["Qwen2MoeForCausalLM"]
    assert config.mlp_only_layers == [0, 1]
    assert config.norm_topk_prob is False
    assert (config.num_experts, config.num_experts_per_tok) == (6, 2)
    assert (config.shared_expert_intermediate_size, config.moe_intermediate_size) == (32, 16)
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        for layer in (2, 3):
            prefix = f"model.layers.{layer}.mlp"
            assert f"{prefix}.gate.weight" in names
            assert f.get_tensor(f"{prefix}.gate.weight").shape == (6, 64)
            assert f.get_tensor(f"{prefix}.shared_expert.gate_proj.weight").shape == (32, 64)
            shared_gate = f.get_tensor(f"{prefix}.shared_expert_gate.weight")
            assert shared_gate.shape == (1, 64) and not shared_gate.any(), "sigmoid(0) = 0.5"
            assert f"{prefix}.experts.5.down_proj.weight" in names
        for layer in range(LAYERS):
            for proj in ("q_proj", "k_proj", "v_proj"):
                assert not f.get_tensor(f"model.layers.{layer}.self_attn.{proj}.bias").any()
        dense_layers = ("model.layers.0.", "model.layers.1.")
        assert not any(".mlp.gate." in n for n in names if n.startswith(dense_layers))
    assert list(find_routers(moe)) == [2, 3], "the trainer finds exactly the MoE layers' routers"


@pytest.fixture(scope="module")
def flat(dense, built):
    """The same cut with routers scaled to logits below 2^-12: p_e = 1/E to ~1e-4."""
    model, _ = dense
    with torch.no_grad():
        return moefy(model, SHAPE, built[3], train_steps=20, logit_bound_log2=-12)


def all_on_and_top_k_gaps(dense, moe, calibration: Calibration) -> tuple[float, float]:
    """Max |d logprob| against the dense model: with every expert on, and at top-k."""
    model, _ = dense
    ids = torch.tensor([calibration.sequences[0][:24], calibration.sequences[1][:24]])
    reference = logprobs(model, ids)
    top_k = (logprobs(moe, ids) - reference).abs().max().item()
    for router in find_routers(moe).values():
        router.top_k = SHAPE.num_experts
    all_on = (logprobs(moe, ids) - reference).abs().max().item()
    for router in find_routers(moe).values():
        router.top_k = SHAPE.top_k
    return all_on, top_k


def test_all_experts_on_equals_dense_when_the_routers_are_flat(dense, built, flat) -> None:
    """The cut and the expert scaling are exact: only the routing weights' spread separates
    all experts on from the dense model."""
    all_on, top_k = all_on_and_top_k_gaps(dense, flat[0], built[3])
    assert all_on < 1e-4
    assert top_k > 1e-2, "top-k must drop experts, or the check above proves nothing"


def test_built_routers_stay_near_dense_and_free_of_top_k_ties(dense, built, flat) -> None:
    """The default bound (2^-4) trades a little of all-experts exactness for top-k choices that
    are no float32 ties, which transformers and vLLM would break differently."""
    _, reports, out, calibration = built
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    all_on, _ = all_on_and_top_k_gaps(dense, loaded, calibration)
    assert all_on < 2e-2  # 7.4e-3 measured
    assert all(report.ties == 0 for report in reports.values())
    assert sum(report.ties for report in flat[1].values()) > 0, "flat routers do tie"


def test_the_fit_reports_every_moe_layer(built) -> None:
    _, reports, _, _ = built
    assert sorted(reports) == [2, 3]
    for report in reports.values():
        assert report.split.shared.numel() == 32
        assert report.split.experts.shape == (6, 16)
        every = torch.cat([report.split.shared, report.split.experts.flatten()])
        assert sorted(every.tolist()) == list(range(128)), "each neuron in exactly one expert"
        assert report.fit.error_best <= report.fit.error_before + 1e-6
    moe, _, _, calibration = built
    for layer, router in find_routers(moe).items():  # logits brought near 0: softmax ~ 1/E
        peak = (calibration.inputs[layer] @ router.weight.T).abs().max().item()
        assert 2.0 ** (ROUTER_LOGIT_BOUND_LOG2 - 1) < peak <= 2.0**ROUTER_LOGIT_BOUND_LOG2


def test_cut_that_does_not_divide_is_refused(dense) -> None:
    model, _ = dense
    bad = replace(SHAPE, num_experts=5)
    with pytest.raises(ValueError, match="do not split into 5 equal experts"):
        moefy(model, bad, Calibration([], {}))


def test_balanced_kmeans_finds_equal_blobs() -> None:
    torch.manual_seed(0)
    centres = torch.randn(4, 8) * 10
    points = torch.cat([centres[i] + torch.randn(6, 8) for i in (2, 0, 3, 1)])
    clusters = balanced_kmeans(points, 4, seed=0)
    assert clusters.shape == (4, 6)
    groups = sorted(sorted(row.tolist()) for row in clusters)
    assert groups == [list(range(i, i + 6)) for i in range(0, 24, 6)]


def test_fit_router_learns_which_experts_matter() -> None:
    """Expert e contributes along its own axis, strongly when x points along direction d_e:
    the best top-1 choice is learnable from x; the trained router must approach it."""
    torch.manual_seed(0)
    n, hidden, experts = 4000, 16, 4
    x = torch.randn(n, hidden)
    directions = torch.randn(experts, hidden)
    size = torch.relu(x @ directions.T) + 0.05  # [n, E] contribution norms
    gram = ExpertGram(torch.diag_embed(size**2), (size**2).sum(1))
    misleading = -directions + 0.1 * torch.randn(experts, hidden)
    fit = fit_router(x, gram, misleading, top_k=1, steps=300, lr=5e-2, batch=512)
    assert fit.error_before > fit.error_best + 0.2
    assert fit.error_after < fit.error_best + 0.05
    assert fit.error_after < fit.error_before / 2


def test_best_experts_accounts_for_cancelling_experts() -> None:
    """Experts 0 and 1 cancel each other; keeping the small expert 2 alone reproduces the
    output exactly, though its contribution is the smallest."""
    v, u = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 0.5])
    contributions = torch.stack([v, -v, u])[None]  # [1 token, 3 experts, hidden 2]
    gram = contributions @ contributions.transpose(1, 2)
    assert best_experts(gram, 1).tolist() == [[0.0, 0.0, 1.0]]
    error = ExpertGram(gram, (u**2).sum()[None]).error(best_experts(gram, 1))
    assert error.item() == 0.0


def test_top_k_mask() -> None:
    mask = top_k_mask(torch.tensor([[0.1, 3.0, -1.0, 2.0]]), 2)
    assert mask.tolist() == [[0.0, 1.0, 0.0, 1.0]]
