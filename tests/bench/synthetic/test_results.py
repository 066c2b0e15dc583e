"""The typed results read and write exactly the published JSON: the committed quality.json and
every run of the committed ledger round-trip unchanged."""

from __future__ import annotations

import json
from pathlib import Path

from roma_bench.results import RunRecord
from roma_bench.synthetic.results import QualityResults

RESULTS = Path(__file__).resolve().parents[3] / "results"


def test_quality_json_round_trips_byte_for_byte() -> None:
    text = (RESULTS / "quality.json").read_text()
    assert QualityResults.model_validate(json.loads(text)).to_json() == text


def test_ledger_runs_round_trip() -> None:
    records = [json.loads(line) for line in (RESULTS / "runs.jsonl").read_text().splitlines()]
    runs = [r for r in records if "patch" in r]
    assert runs
    for record in runs:
        assert RunRecord.model_validate(record).model_dump(exclude_none=True) == record
