"""The real benchmark's splits: disjoint, capped, seeded, drawn from the right source splits,
and scaled down in proportion when a task has fewer samples than its caps add up to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from roma_bench.real.splits import partition, role_sources, write_out_of_set, write_splits
from roma_trainer.data import Sample

CAPS = {"train": 20, "val": 5, "test": 10}


def _samples(task: str, split: str, n: int) -> list[Sample]:
    return [Sample(task, f"{task} {split} {i}?", (" a", " b"), i % 2) for i in range(n)]


def test_role_sources_prefer_train_for_the_pool_and_test_for_test() -> None:
    assert role_sources(["test", "train", "validation"]) == {
        "train": "train",
        "val": "validation",
        "test": "test",
    }
    assert role_sources(["train", "validation"])["test"] == "validation"
    assert set(role_sources(["validation"]).values()) == {"validation"}
    with pytest.raises(ValueError, match="no split for val"):
        role_sources(["train"])


def test_a_shared_source_is_split_disjointly_and_scaled_in_proportion() -> None:
    """COPA's case: 100 validation samples for caps adding up to 350."""
    caps = {"train": 200, "val": 50, "test": 100}
    sources = {"validation": _samples("copa", "validation", 100)}
    roles = role_sources(["validation"])
    found = partition(sources, roles, caps, "0/copa")
    assert {r: len(v) for r, v in found.items()} == {"train": 57, "val": 14, "test": 28}
    prompts = [s.prompt for v in found.values() for s in v]
    assert len(set(prompts)) == len(prompts)
    assert found == partition(sources, roles, caps, "0/copa")  # seeded: the same again
    assert found != partition(sources, roles, caps, "1/copa")


def test_caps_hold_and_each_role_reads_its_own_source() -> None:
    sources = {s: _samples("piqa", s, 100) for s in ("train", "validation")}
    found = partition(sources, role_sources(list(sources)), CAPS, "0/piqa")
    assert {r: len(v) for r, v in found.items()} == CAPS
    assert all(" train " in s.prompt for s in found["train"])
    assert all(" validation " in s.prompt for s in found["val"] + found["test"])
    assert not {s.prompt for s in found["val"]} & {s.prompt for s in found["test"]}


def test_written_splits_hold_every_task(tmp_path: Path) -> None:
    splits = {"arc_easy": ("test", "train", "validation"), "sciq": ("validation",)}
    paths = write_splits(
        tmp_path,
        list(splits),
        CAPS,
        seed=0,
        load=lambda task, split: _samples(task, split, 40),
        splits_of=lambda task: splits[task],
    )
    rows = {r: [json.loads(x) for x in p.read_text().splitlines()] for r, p in paths.items()}
    assert [r["task"] for r in rows["test"]].count("arc_easy") == 10
    # SciQ: 40 validation samples shared by caps adding up to 35.
    assert [r["task"] for r in rows["train"]].count("sciq") == 20
    out = write_out_of_set(tmp_path, ["csqa"], 3, 0, lambda t, s: _samples(t, s, 10))
    assert len(out.read_text().splitlines()) == 3
