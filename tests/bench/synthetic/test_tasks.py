"""The benchmark's task generators: deterministic, well-formed, and the test split held out."""

from __future__ import annotations

import random

import pytest

from roma_bench.synthetic import tasks
from roma_trainer.data import load_samples


def group_of(task: tasks.Task, prompt: str) -> set[str]:
    return {
        group
        for group, frames in task.frames.items()
        for frame in frames
        if tasks.frame_regex(frame).match(prompt)
    }


def test_at_least_six_domains_with_disjoint_frame_groups() -> None:
    assert len(tasks.TASKS) >= 6
    for task in tasks.TASKS.values():
        groups = [set(task.frames[g]) for g in ("pretrain", "adapt", "val", "test", "read")]
        assert all(groups), task.name
        for i, a in enumerate(groups):
            for b in groups[i + 1 :]:
                assert not a & b, task.name


def test_generators_are_deterministic() -> None:
    for split in ("train", "val", "test"):
        assert tasks.generate(split, 5, seed=3) == tasks.generate(split, 5, seed=3)
    assert tasks.generate("test", 5, seed=3) != tasks.generate("test", 5, seed=4)
    stream_a, stream_b = tasks.pretraining_pairs(1), tasks.pretraining_pairs(1)
    assert [next(stream_a) for _ in range(50)] == [next(stream_b) for _ in range(50)]


def test_samples_are_well_formed_and_load_in_the_trainer(tmp_path) -> None:
    paths = tasks.write_splits(tmp_path, seed=0, n_train=10, n_val=4, n_test=6)
    for split, path in paths.items():
        samples = load_samples(path)  # the trainer's own validation
        assert {s.task for s in samples} == set(tasks.TASKS)
        for s in samples:
            assert len(set(s.choices)) == len(s.choices) == tasks.TASKS[s.task].n_choices
            assert 0 <= s.answer < len(s.choices)
        assert len({s.prompt for s in samples}) == len(samples), f"repeated prompt in {split}"


def test_test_split_is_disjoint_and_uses_only_held_out_frames() -> None:
    train = tasks.generate("train", 40)
    val = tasks.generate("val", 20)
    test = tasks.generate("test", 30)
    prompts = {
        name: {s["prompt"] for s in split}
        for name, split in (("train", train), ("val", val), ("test", test))
    }
    assert not prompts["test"] & prompts["train"]
    assert not prompts["test"] & prompts["val"]
    assert not prompts["val"] & prompts["train"]
    expected = {"train": {"pretrain", "adapt"}, "val": {"val"}, "test": {"test"}}
    for name, split in (("train", train), ("val", val), ("test", test)):
        for s in split:
            groups = group_of(tasks.TASKS[s["task"]], s["prompt"])
            assert groups and groups <= expected[name], (name, s["prompt"], groups)
    # Every held-out test frame is actually used.
    used = {
        (s["task"], f)
        for s in test
        for f in tasks.TASKS[s["task"]].frames["test"]
        if tasks.frame_regex(f).match(s["prompt"])
    }
    assert len(used) == sum(len(t.frames["test"]) for t in tasks.TASKS.values())


def test_pretraining_stream_uses_only_pretraining_frames() -> None:
    stream = tasks.pretraining_pairs(0)
    seen_task = 0
    for _ in range(400):
        prompt, answer, domain, taught = next(stream)
        if not answer:  # a background sentence: words only, no cue, no domain
            assert not any(prompt.endswith(c) for c in tasks.CUES)
            assert domain is None and not taught
            continue
        seen_task += 1
        assert taught
        matches = {g for t in tasks.TASKS.values() for g in group_of(t, prompt)}
        assert matches == {"pretrain"}, prompt
        assert group_of(tasks.TASKS[domain], prompt) == {"pretrain"}, (domain, prompt)
    assert seen_task > 300


def test_read_share_swaps_in_read_frames_that_the_router_is_not_taught() -> None:
    stream = tasks.pretraining_pairs(0, read_share=0.5)
    groups: dict[bool, set[str]] = {True: set(), False: set()}
    for _ in range(800):
        prompt, answer, domain, taught = next(stream)
        if answer:
            assert domain is not None
            groups[taught] |= group_of(tasks.TASKS[domain], prompt)
    assert groups == {True: {"pretrain"}, False: {"read"}}
    # The read frames stay out of the lexicon: the tokenizer and the background sentences of
    # the bundled model do not depend on them.
    read_only = {"if"}  # a word only the read frames use
    assert not read_only & set(tasks.lexicon())


@pytest.mark.parametrize("split", ["train", "val"])
def test_held_out_distractor_style_only_in_test(split: str) -> None:
    # The held-out style of `length` ("letters") proposes twice the length, which no other
    # style of that task can produce for n >= 4.
    samples = [s for s in tasks.generate(split, 200) if s["task"] == "length"]
    for s in samples:
        n = int(s["choices"][s["answer"]])
        if n >= 5:
            assert str(2 * n) not in s["choices"], s
    test = [s for s in tasks.generate("test", 200) if s["task"] == "length"]
    assert any(
        str(2 * int(s["choices"][s["answer"]])) in s["choices"]
        for s in test
        if int(s["choices"][s["answer"]]) >= 5
    )


def test_topping_up_distractors_never_uses_an_excluded_style() -> None:
    """A style with too few distinct values is topped up from the split's own styles only:
    the held-out style must not reach training or validation through the top-up."""
    task = tasks.Task(
        "toy",
        {"pretrain": ("{a}",), "adapt": ("{a}",), "val": ("{a}",), "test": ("{a}",)},
        lambda rng: tasks.Instance(
            {"a": "1"}, "0", {"few": ["1"], "many": ["2", "3", "4"], "held": ["7", "8", "9"]}
        ),
        n_choices=4,
        styles=("few", "many", "held"),
    )
    rng = random.Random(0)
    for _ in range(50):
        sample = tasks.make_sample(task, rng, "{a}", ("few", "many"))
        assert len(sample["choices"]) == 4
        assert not {"7", "8", "9"} & set(sample["choices"]), sample


def test_frame_of_finds_the_frame_a_prompt_was_rendered_from() -> None:
    rng = random.Random(7)
    for task in tasks.TASKS.values():
        styles = task.styles[:-1]
        for group, frames in task.frames.items():
            for frame in frames:
                for _ in range(3):
                    sample = tasks.make_sample(task, rng, frame, styles)
                    assert tasks.frame_of(task.name, sample["prompt"]) == (group, frame)
    assert tasks.frame_of("reverse", "Add 2 and 3. Answer:") is None
