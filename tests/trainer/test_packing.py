"""Choices packed behind their shared prompt: grouping, positions, the mask, and the way back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from roma_trainer.packing import Layout, can_share_prompts
from roma_trainer.scoring import Encoded


def encoded(rows: list[tuple[list[int], list[int]]]) -> Encoded:
    """Right-padded (prompt ids, continuation ids) rows, as ``encode_pairs`` makes them."""
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, : len(p) + len(c)] = 1
    return Encoded(ids, mask, [len(p) for p, _ in rows], [len(c) for _, c in rows], [0] * len(rows))


P, Q = [5, 6, 7], [8, 9]
ENC = encoded([(P, [20]), (P, [21, 22]), (Q, [23]), (P, [24])])


def test_consecutive_rows_with_the_same_prompt_share_a_packed_row() -> None:
    layout = Layout.of(ENC)
    assert layout.row_of == [0, 0, 1, 2]  # the last P row is not next to the first two
    assert layout.start_of == [3, 4, 2, 3]
    assert layout.width == 6 and layout.shared
    assert layout.position_ids[0].tolist() == [0, 1, 2, 3, 3, 4]  # each choice starts at 3
    assert layout.segment[0].tolist() == [0, 0, 0, 1, 2, 2]
    assert layout.segment[1].tolist() == [0, 0, 1, -1, -1, -1]
    packed = layout.pack(ENC, ENC.input_ids)
    assert packed[0].tolist() == [5, 6, 7, 20, 21, 22]
    assert packed[1].tolist() == [8, 9, 23, 0, 0, 0]


@pytest.fixture(scope="module")
def sdpa(tiny_models: dict[str, Path]):
    return AutoModelForCausalLM.from_pretrained(tiny_models["olmoe"], attn_implementation="sdpa")


@pytest.fixture(scope="module")
def eager(tiny_models: dict[str, Path]):
    return AutoModelForCausalLM.from_pretrained(tiny_models["olmoe"], attn_implementation="eager")


def test_a_choice_sees_the_prompt_and_itself_only(sdpa) -> None:
    mask = Layout.of(ENC).attention_mask(sdpa, torch.float32)
    assert mask.dtype == torch.bool and mask.shape == (3, 1, 6, 6)
    row = mask[0, 0]
    assert row[2].tolist() == [True, True, True, False, False, False]  # prompt: causal
    assert row[3].tolist() == [True, True, True, True, False, False]  # choice 1
    assert row[4].tolist() == [True, True, True, False, True, False]  # choice 2, not choice 1
    assert row[5].tolist() == [True, True, True, False, True, True]
    padding = mask[1, 0, 4]
    assert padding.any() and not padding[3:].any()  # padding sees the prompt, never padding


def test_eager_gets_an_additive_mask_with_the_same_pattern(sdpa, eager) -> None:
    layout = Layout.of(ENC)
    boolean = layout.attention_mask(sdpa, torch.float32)
    additive = layout.attention_mask(eager, torch.float32)
    assert additive.dtype == torch.float32
    assert torch.equal(additive == 0, boolean)


def test_unpack_index_maps_every_real_token_back() -> None:
    layout = Layout.of(ENC)
    values = torch.randn(*ENC.input_ids.shape, 3)
    values[1, :3] = values[0, :3]  # a shared prompt has one set of states
    packed = layout.pack(ENC, values)
    back = packed.reshape(-1, 3).index_select(0, layout.unpack_index(ENC))
    back = back.view(values.shape)
    real = ENC.attention_mask.bool()
    assert torch.equal(back[real], values[real])


def test_without_sharing_every_row_is_its_own_and_the_mask_is_2d(sdpa) -> None:
    layout = Layout.of(ENC, share=False)
    assert layout.row_of == [0, 1, 2, 3] and not layout.shared
    assert torch.equal(layout.pack(ENC, ENC.input_ids), ENC.input_ids)
    assert torch.equal(layout.attention_mask(sdpa, torch.float32), ENC.attention_mask)


def test_models_with_a_sliding_window_do_not_share(
    tiny_models: dict[str, Path], tiny_qwen2_moe: Path
) -> None:
    assert can_share_prompts(AutoModelForCausalLM.from_pretrained(tiny_models["qwen3_moe"]))
    assert not can_share_prompts(AutoModelForCausalLM.from_pretrained(tiny_qwen2_moe))
