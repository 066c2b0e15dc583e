"""Sample files in the trainer's JSONL format: ``{"task", "prompt", "choices", "answer"}``
a line."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from roma_trainer.data import Sample


def sample_row(sample: Sample) -> dict[str, Any]:
    return asdict(sample) | {"choices": list(sample.choices)}


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
