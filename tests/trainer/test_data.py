"""Data loading: every bad-data case names the file and line (CLI exit 2), HF column mapping,
and the data fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset
from typer.testing import CliRunner

from roma_trainer.cli import app
from roma_trainer.config import ColumnMap
from roma_trainer.data import (
    DataError,
    Sample,
    data_fingerprint,
    load_jsonl,
    load_samples,
    samples_from_rows,
)

GOOD = {"task": "t", "prompt": "Q: 1+1?\nA:", "choices": [" 2", " 3"], "answer": 0}
SAMPLE_FILE = Path(__file__).parents[2] / "trainer" / "data" / "sample.jsonl"

# (name, the bad line as written in the file, words the message must contain)
BAD_LINES = [
    ("not-json", '{"task": "t", "prompt": ', "not valid JSON"),
    ("not-an-object", "[1, 2, 3]", "expected a JSON object"),
    ("missing-task", json.dumps({k: v for k, v in GOOD.items() if k != "task"}), "'task'"),
    ("missing-prompt", json.dumps({k: v for k, v in GOOD.items() if k != "prompt"}), "'prompt'"),
    ("missing-choices", json.dumps({k: v for k, v in GOOD.items() if k != "choices"}), "'choices'"),
    ("missing-answer", json.dumps({k: v for k, v in GOOD.items() if k != "answer"}), "'answer'"),
    ("answer-too-big", json.dumps(GOOD | {"answer": 2}), "out of range"),
    ("answer-negative", json.dumps(GOOD | {"answer": -1}), "out of range"),
    ("answer-not-int", json.dumps(GOOD | {"answer": "0"}), "integer"),
    ("answer-bool", json.dumps(GOOD | {"answer": True}), "integer"),
    ("one-choice", json.dumps(GOOD | {"choices": [" 2"]}), "at least 2"),
    ("choice-not-str", json.dumps(GOOD | {"choices": [" 2", 3]}), "choice 1"),
    ("empty-choice", json.dumps(GOOD | {"choices": [" 2", ""]}), "choice 1"),
    ("empty-prompt", json.dumps(GOOD | {"prompt": ""}), "'prompt'"),
    ("task-not-str", json.dumps(GOOD | {"task": 3}), "'task'"),
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(("name", "line", "words"), BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_bad_line_names_file_and_line(tmp_path: Path, name: str, line: str, words: str) -> None:
    # Two good lines, a blank line (skipped, but counted), then the bad one: line 4.
    path = write_lines(tmp_path / f"{name}.jsonl", [json.dumps(GOOD), json.dumps(GOOD), "", line])
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    assert info.value.where == f"{path}:4"
    assert str(info.value).startswith(f"{path}:4: ")
    assert words in str(info.value)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = write_lines(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=r"empty\.jsonl:1: the file holds no samples"):
        load_jsonl(empty)
    blank = write_lines(tmp_path / "blank.jsonl", ["", "   "])
    with pytest.raises(DataError, match="holds no samples"):
        load_jsonl(blank)
    with pytest.raises(DataError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_shipped_sample_file_loads() -> None:
    samples = load_jsonl(SAMPLE_FILE)
    assert len(samples) >= 24
    assert len({s.task for s in samples}) >= 2
    assert all(0 <= s.answer < len(s.choices) for s in samples)


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "deepseek_v2"])
@pytest.mark.parametrize(
    ("name", "line", "words"), BAD_LINES[:8], ids=[b[0] for b in BAD_LINES[:8]]
)
def test_cli_exits_2_naming_file_and_line(
    tiny_models: dict[str, Path], tmp_path: Path, family: str, name: str, line: str, words: str
) -> None:
    """The data is checked before the model is loaded, so these runs take a second each."""
    path = write_lines(tmp_path / f"{name}.jsonl", [json.dumps(GOOD), line])
    result = CliRunner().invoke(
        app,
        ["train", "--model", str(tiny_models[family]), "--data", str(path), "--out",
         str(tmp_path / "p.safetensors")],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"{path.name}:2:" in result.output.replace("\n", "")
    assert words in result.output.replace("\n", "")
    assert not (tmp_path / "p.safetensors").exists()


def test_cli_empty_file_exits_2(tiny_olmoe: Path, tmp_path: Path) -> None:
    path = write_lines(tmp_path / "empty.jsonl", [])
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_olmoe), "--data", str(path)])
    assert result.exit_code == 2
    assert "holds no samples" in result.output


def test_hf_column_mapping_with_letter_answers() -> None:
    """ARC-style rows: nested choices and a letter answer looked up in the labels."""
    rows = Dataset.from_list(
        [
            {
                "id": "q1",
                "question": "Which is a planet?",
                "choices": {"text": ["Mars", "Moon"], "label": ["A", "B"]},
                "answerKey": "A",
            },
            {
                "id": "q2",
                "question": "Which is wet?",
                "choices": {"text": ["sand", "water", "fire"], "label": ["A", "B", "C"]},
                "answerKey": "B",
            },
        ]
    )
    columns = ColumnMap(
        prompt="question",
        choices="choices.text",
        answer="answerKey",
        answer_labels="choices.label",
        task_name="arc",
        prompt_template="Question: {prompt}\nAnswer:",
        choice_prefix=" ",
    )
    samples = samples_from_rows(rows, columns, "arc")
    assert samples == [
        Sample("arc", "Question: Which is a planet?\nAnswer:", (" Mars", " Moon"), 0),
        Sample("arc", "Question: Which is wet?\nAnswer:", (" sand", " water", " fire"), 1),
    ]


def test_hf_column_mapping_errors_name_the_row() -> None:
    rows = Dataset.from_list(
        [
            {"q": "a?", "opts": ["x", "y"], "label": 1, "subject": "s"},
            {"q": "b?", "opts": ["x", "y"], "label": 5, "subject": "s"},
        ]
    )
    columns = ColumnMap(prompt="q", choices="opts", answer="label", task="subject")
    with pytest.raises(DataError, match=r"mc\[1\]: 'answer' 5 is out of range"):
        samples_from_rows(rows, columns, "mc")
    with pytest.raises(DataError, match=r"mc\[0\]: column 'question' not found"):
        samples_from_rows(rows, ColumnMap(choices="opts", answer="label"), "mc")


def test_hf_dataset_from_disk(tmp_path: Path) -> None:
    """The real ``datasets.load_dataset`` path, on a local dataset directory (no hub here)."""
    rows = [{"question": f"q{i}?", "choices": ["a", "b"], "answer": i % 2} for i in range(4)]
    Dataset.from_list(rows).to_json(tmp_path / "mc" / "train.jsonl")
    samples = load_samples(
        f"hf:{tmp_path / 'mc'}", hf_split="train", columns=ColumnMap(task_name="mc")
    )
    assert [s.answer for s in samples] == [0, 1, 0, 1]
    with pytest.raises(DataError, match="could not load the dataset"):
        load_samples(f"hf:{tmp_path / 'missing'}")


def test_data_fingerprint_ignores_formatting_not_content(tmp_path: Path) -> None:
    a = write_lines(tmp_path / "a.jsonl", [json.dumps(GOOD), json.dumps(GOOD | {"answer": 1})])
    reordered = {"answer": 0, "choices": [" 2", " 3"], "prompt": GOOD["prompt"], "task": "t"}
    b = write_lines(
        tmp_path / "b.jsonl",
        ["", json.dumps(reordered, indent=None), json.dumps(GOOD | {"answer": 1})],
    )
    assert data_fingerprint(load_jsonl(a)) == data_fingerprint(load_jsonl(b))
    c = write_lines(tmp_path / "c.jsonl", [json.dumps(GOOD), json.dumps(GOOD | {"answer": 0})])
    assert data_fingerprint(load_jsonl(a)) != data_fingerprint(load_jsonl(c))
    swapped = list(reversed(load_jsonl(a)))
    assert data_fingerprint(swapped) != data_fingerprint(load_jsonl(a))
