"""The recipe's typed configuration: a YAML (or TOML) file, then command-line overrides.

Every field has a default so that ``roma-train train --data D`` alone is a valid run; the shipped
``configs/roma_default.yaml`` spells the defaults out. Unknown keys are errors (a typo in a
config file must not silently fall back to a default).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Objective = Literal["manifold", "ce", "l1", "l2", "entropy"]
NeighbourMode = Literal["knn", "eps", "random"]
TokenPosition = Literal["last", "first", "middle"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
HiddenCacheMode = Literal["off", "memory", "disk"]

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "roma_default.yaml"
_LAYERS_RE = re.compile(r"^(all|last\d+)$")


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the CLI prints it and exits 2."""


class ColumnMap(BaseModel):
    """How the columns of a Hugging Face dataset become ``{task, prompt, choices, answer}``.

    Dotted names reach into nested columns (``choices.text``). ``answer`` may be an integer
    index, or a label looked up in ``answer_labels`` (e.g. ARC's ``answerKey`` "B" in
    ``choices.label``). ``prompt_template`` formats the prompt column; ``choice_prefix`` is put
    before every choice (a space, so that " Paris" follows "Answer:" as in running text).
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str = "question"
    choices: str = "choices"
    answer: str = "answer"
    answer_labels: str | None = None
    task: str | None = None
    task_name: str | None = None
    prompt_template: str = "{prompt}"
    choice_prefix: str = ""


class TrainConfig(BaseModel):
    """One training run. See ``configs/roma_default.yaml`` for the documented defaults."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="HF model id or path; None = the embedded default")
    trust_remote_code: bool = Field(
        False, description="run the checkpoint's own modelling code (DeepSeekMoE 16B needs it)"
    )
    data: str | None = Field(None, description="JSONL path, or hf:NAME for a Hugging Face dataset")
    hf_config: str | None = None
    hf_split: str = "train"
    columns: ColumnMap = Field(default_factory=ColumnMap)
    out: Path = Path("router_patch.safetensors")

    objective: Objective = "manifold"
    neighbours: NeighbourMode = "knn"
    k: int = Field(3, ge=1)
    eps: float = Field(0.5, gt=0)
    sigma: float | None = Field(None, gt=0, description="kernel bandwidth; None = median distance")
    neighbour_routing: Literal["base", "live"] = Field(
        "base",
        description="r_j of a neighbour: its routing under the base routers (fixed targets) or "
        "under the routers being trained (recomputed every step, with gradient)",
    )
    lam: float = Field(1.0, ge=0)
    lam_warmup_steps: int = Field(10, ge=0)
    layers: str | list[int] = "last5"
    token: TokenPosition = "last"

    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    dtype: DType = "float32"
    device: str = "cpu"
    embedder: str | None = Field(None, description="sentence-transformers id or path")
    embed_batch_size: int = Field(64, ge=1)
    hidden_cache: HiddenCacheMode = Field(
        "memory",
        description="keep the hidden states entering the first tuned layer per sequence and run "
        "only the tuned layers at every step: memory | disk (also saved under hidden_cache_dir "
        "for later runs on the same model and data) | off",
    )
    hidden_cache_dir: Path | None = Field(
        None, description="disk mode's folder; None = $ROMA_CACHE_DIR/hidden-states"
    )

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: str | list[int]) -> str | list[int]:
        if isinstance(value, str):
            value = value.strip()
            if _LAYERS_RE.match(value):
                return value
            try:
                return [int(part) for part in value.split(",") if part.strip()]
            except ValueError:
                raise ValueError(
                    f"layers {value!r}: use 'all', 'lastN' (e.g. last5) or a list like 3,4,5"
                ) from None
        if not value:
            raise ValueError("layers: the list is empty")
        return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML or TOML config file into a plain dict (TOML by the ``.toml`` suffix)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of options")
    return data


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The default config file (or ``path``) with ``overrides`` (None values ignored) on top."""
    values = read_config_file(path if path is not None else DEFAULT_CONFIG)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid training config: {problems}") from exc
