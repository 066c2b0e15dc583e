"""Served equals trained on the real model (issue 14): the SmolLM2-MoE is built from the
installed wheel, a RoMA k-NN patch is trained on a few ARC-Easy training samples with the real
trainer and MiniLM, and ``benchmarks/real_served_equals_trained.py`` pushes it to a real
``roma-serve`` (gateway, vLLM-CPU engine, Redis): every (prompt, choice) log-likelihood served
equals transformers offline within 1e-3, with the same accuracy, under the base routers and
under the patch. Several minutes on 2 cores (the build alone about 2.5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from roma_bench.samples import sample_row, write_jsonl
from roma_models import default_model_dir
from roma_trainer.config import load_config
from roma_trainer.data import load_samples
from roma_trainer.recipe import run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "real_served_equals_trained.py"
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def real_model() -> Path:
    """The embedded default, built once into the session's ROMA_MODELS_DIR."""
    return default_model_dir()


def test_a_trained_roma_patch_scores_the_same_served_and_offline(
    real_model: Path, tmp_path: Path
) -> None:
    pool = load_samples("olmes:arc_easy:train")[:24]
    data = write_jsonl(map(sample_row, pool), tmp_path / "pool.jsonl")
    patch = tmp_path / "roma.safetensors"
    cfg = load_config(
        None,
        {
            "model": str(real_model),
            "data": str(data),
            "out": str(patch),
            "objective": "manifold",
            "neighbours": "knn",
            "k": 3,
            "layers": "last5",
            # Large enough for a few steps to move the routers of a MoEfied model whose logits
            # are ~1e-2 (docs/real-quality.md, "Scales").
            "lr": 1e-3,
            "lam": 1e5,
            "max_steps": 4,
            "batch_size": 8,
            "seed": 0,
        },
    )
    assert run(cfg) == patch

    figures = tmp_path / "served.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(real_model), "--task", "arc_easy",
         "--samples", "8", "--patch", str(patch), "--json", str(figures)],
        cwd=tmp_path, capture_output=True, text=True, timeout=1500, check=False,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    found = json.loads(figures.read_text())
    for routers in ("base", "patched"):
        row = found["rows"][routers]
        assert row["choices"] > 0, routers
        assert row["max_abs_dlogprob"] <= TOLERANCE, (routers, row)
        assert row["choices_over_tolerance"] == 0, (routers, row)
        assert row["served_acc"] == row["offline_acc"], (routers, row)
    # The trained patch is in effect: it moved the offline scores away from the base's.
    assert found["patch_moved_max"] > TOLERANCE
