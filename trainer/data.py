"""Multiple-choice samples: from JSONL files, Hugging Face datasets or OLMES benchmark splits,
validated, fingerprinted.

JSONL: one object a line, ``{"task": str, "prompt": str, "choices": [str, ...], "answer": int}``
(blank lines are skipped). A problem raises :class:`DataError` naming the file and the 1-based
line, so the user can open the file at the right place; the CLI exits 2 with that message.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from roma_trainer.config import ColumnMap

HF_PREFIX = "hf:"


class DataError(ValueError):
    """Bad training or evaluation data; ``where`` is ``file:line`` (or ``dataset[row]``)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where


@dataclass(frozen=True)
class Sample:
    """One multiple-choice question; ``answer`` indexes ``choices``."""

    task: str
    prompt: str
    choices: tuple[str, ...]
    answer: int


def parse_sample(obj: Any, where: str) -> Sample:
    """Validate one decoded record; every rule here has a test in tests/trainer/test_data.py."""
    if not isinstance(obj, dict):
        raise DataError(where, f"expected a JSON object, got {type(obj).__name__}")
    for key in ("task", "prompt", "choices", "answer"):
        if key not in obj:
            raise DataError(where, f"missing field {key!r} (need task, prompt, choices, answer)")
    task, prompt, choices, answer = obj["task"], obj["prompt"], obj["choices"], obj["answer"]
    if not isinstance(task, str) or not task:
        raise DataError(where, "'task' must be a non-empty string")
    if not isinstance(prompt, str) or not prompt:
        raise DataError(where, "'prompt' must be a non-empty string")
    if not isinstance(choices, list) or len(choices) < 2:
        raise DataError(where, "'choices' must be a list of at least 2 strings")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise DataError(where, f"choice {i} must be a non-empty string")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise DataError(where, f"'answer' must be an integer index, got {answer!r}")
    if not 0 <= answer < len(choices):
        raise DataError(
            where, f"'answer' {answer} is out of range for {len(choices)} choices (0-based)"
        )
    return Sample(task=task, prompt=prompt, choices=tuple(choices), answer=answer)


def load_jsonl(path: str | Path) -> list[Sample]:
    """Read and validate a JSONL file; raises :class:`DataError` at the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "file does not exist")
    samples: list[Sample] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(where, f"not valid JSON ({exc.msg})") from None
            samples.append(parse_sample(obj, where))
    if not samples:
        raise DataError(f"{path}:1", "the file holds no samples")
    return samples


def _get(row: Mapping[str, Any], dotted: str) -> Any:
    """``row['choices']['text']`` for ``choices.text``: nested HF columns, e.g. ARC's."""
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def samples_from_rows(
    rows: Iterable[Mapping[str, Any]], columns: ColumnMap, name: str
) -> list[Sample]:
    """Map dataset rows to samples through ``columns``; errors name ``name[row]``."""
    samples = []
    for index, row in enumerate(rows):
        where = f"{name}[{index}]"
        try:
            prompt = _get(row, columns.prompt)
            choices = _get(row, columns.choices)
            answer = _get(row, columns.answer)
            labels = _get(row, columns.answer_labels) if columns.answer_labels else None
            task = _get(row, columns.task) if columns.task else (columns.task_name or name)
        except KeyError as exc:
            raise DataError(where, f"column {exc.args[0]!r} not found in {sorted(row)}") from None
        if labels is not None:
            labels = list(labels)
            if answer not in labels:
                raise DataError(where, f"answer {answer!r} is not one of the labels {labels}")
            answer = labels.index(answer)
        elif isinstance(answer, str) and answer.strip().isdigit():
            answer = int(answer)
        if isinstance(prompt, str):
            prompt = columns.prompt_template.format(prompt=prompt)
        if isinstance(choices, list):
            choices = [columns.choice_prefix + c if isinstance(c, str) else c for c in choices]
        # parse_sample checks the mapped values exactly as it checks a JSONL line
        record = {"task": task, "prompt": prompt, "choices": choices, "answer": answer}
        samples.append(parse_sample(record, where))
    if not samples:
        raise DataError(f"{name}[0]", "the dataset split holds no samples")
    return samples


def load_hf(name: str, config: str | None, split: str, columns: ColumnMap) -> list[Sample]:
    """Load a Hugging Face dataset split (hub id or local dataset script/dir) and map it."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many types (network, missing config, ...)
        raise DataError(f"hf:{name}", f"could not load the dataset: {exc}") from exc
    return samples_from_rows(dataset, columns, name)


def load_samples(
    spec: str | Path,
    hf_config: str | None = None,
    hf_split: str = "train",
    columns: ColumnMap | None = None,
) -> list[Sample]:
    """``hf:NAME`` loads a Hugging Face dataset, ``olmes:<task>:<split>`` a benchmark split
    (:mod:`roma_trainer.olmes`); anything else is a JSONL path."""
    spec = str(spec)
    if spec.startswith("olmes:"):
        from roma_trainer.olmes import load_olmes  # it builds on this module's parse_sample

        return load_olmes(spec)
    if spec.startswith(HF_PREFIX):
        return load_hf(spec.removeprefix(HF_PREFIX), hf_config, hf_split, columns or ColumnMap())
    return load_jsonl(spec)


def data_fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 over the samples as canonical JSON lines (sorted keys, UTF-8), in order.

    Normalising (rather than hashing the file) means that formatting, key order and blank lines
    do not change the fingerprint, while any change to a task, prompt, choice or answer does.
    """
    digest = hashlib.sha256()
    for sample in samples:
        record = asdict(sample) | {"choices": list(sample.choices)}
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()
