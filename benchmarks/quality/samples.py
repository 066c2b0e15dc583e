"""Sample files in the trainer's JSONL format: ``{"task", "prompt", "choices", "answer"}``
a line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from roma_trainer.data import Sample


def sample_row(sample: Sample) -> dict[str, Any]:
    return asdict(sample) | {"choices": list(sample.choices)}


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write ``rows`` to ``path`` unless it already holds exactly them; atomically, so that a
    benchmark worker reading the file (a training run loads its data by path) never sees it
    half written by another worker sharing the results folder."""
    path = Path(path)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if path.is_file() and path.read_text() == text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
