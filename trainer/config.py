"""The recipe's typed configuration: a YAML (or TOML) file, then command-line overrides.

:class:`TrainConfig` is the one source of the recipe's options: every field has a default (so
``roma-train train --data D`` alone is a valid run) and a description, from which come the
``roma-train train`` flags and their help (:mod:`roma_trainer.flags`) and the shipped
``configs/roma_default.yaml`` (:func:`render_yaml`; a test keeps the file equal to it). Unknown
keys are errors (a typo in a config file must not silently fall back to a default).
"""

from __future__ import annotations

import re
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo

from roma_trainer import objectives

HiddenCacheMode = Literal["off", "memory", "disk"]

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "roma_default.yaml"
_LAYERS_RE = re.compile(r"^(all|last\d+)$")
_COMMENT_COLUMN = 25  # where the YAML's inline comments start
_WIDTH = 100


class _Null:
    """The override that sets a key to null (in overrides, None means "not given")."""

    def __repr__(self) -> str:
        return "NULL"


NULL: Any = _Null()


def _section(title: str, *notes: str) -> dict[str, Any]:
    """Marks the first field of a group: a blank line and a comment in the YAML, a panel in
    ``--help``."""
    return {"section": title, "notes": list(notes)}


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the CLI prints it and exits 2."""


class ColumnMap(BaseModel):
    """How the columns of a Hugging Face dataset become ``{task, prompt, choices, answer}``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("question", description="column holding the prompt")
    choices: str = Field(
        "choices",
        description="column holding the list of choices (dotted names reach nested columns: "
        "choices.text)",
    )
    answer: str = Field(
        "answer", description="column holding the answer: an index, or a label (answer_labels)"
    )
    answer_labels: str | None = Field(
        None,
        description="column of the choices' labels when the answer is one, e.g. choices.label "
        "for ARC's answerKey 'B'",
    )
    task: str | None = Field(None, description="column naming each sample's task")
    task_name: str | None = Field(
        None,
        description="one task name for the whole dataset, when there is no task column (unset: "
        "the dataset's name)",
    )
    prompt_template: str = Field("{prompt}", description="formats the prompt column")
    choice_prefix: str = Field(
        "",
        description="put before every choice (a space, so that ' Paris' follows 'Answer:' as "
        "in running text)",
    )


class TrainConfig(BaseModel):
    """One training run; the descriptions are the flags' help and the default YAML's comments."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None,
        description="base model: HF id or local path (unset: smollm2-moe, built on first use)",
        json_schema_extra=_section("Data and model"),
    )
    trust_remote_code: bool = Field(
        False, description="run the checkpoint's own modelling code (needed for DeepSeekMoE 16B)"
    )
    data: str | None = Field(
        None,
        description='training data: a JSONL file with one {"task","prompt","choices","answer"} '
        "a line, hf:NAME for a Hugging Face dataset (its columns mapped by columns), or "
        "olmes:TASK:SPLIT for a benchmark split (e.g. olmes:arc_easy:train)",
    )
    hf_config: str | None = Field(None, description="for hf:NAME only: the dataset config name")
    hf_split: str = Field("train", description="for hf:NAME only: the split to train on")
    out: Path = Field(Path("router_patch.safetensors"), description="where to write the patch")
    columns: ColumnMap = Field(
        default_factory=ColumnMap,
        description="how the dataset's columns map to a sample",
        json_schema_extra=_section("Dataset columns (hf:NAME only)"),
    )

    objective: str = Field(
        "manifold",
        description="the loss is CE + lam * the objective's term",
        json_schema_extra={
            "choices": list(objectives.REGISTRY),
            **_section(
                "Objective",
                "L(i) = CE(i) + lam * term(i); the objectives (roma_trainer.objectives):",
                *(f"  {o.name:<9} {o.summary}" for o in objectives.REGISTRY.values()),
            ),
        },
    )
    neighbours: Literal["knn", "eps", "random"] = Field(
        "knn",
        description="how N(i) is chosen in the success set (random: k random members, the "
        "paper's control)",
    )
    k: int = Field(3, ge=1, description="neighbours per sample for knn and random")
    eps: float = Field(
        0.5, gt=0, description="eps-ball radius on normalised embeddings (0.5 ~ cosine 0.875)"
    )
    sigma: float | None = Field(
        None, gt=0, description="Gaussian kernel bandwidth (unset: the median neighbour distance)"
    )
    neighbour_routing: Literal["base", "live"] = Field(
        "base",
        description="r_j of a neighbour: its routing under the base routers (fixed targets) or "
        "under the routers being trained (recomputed every step, with gradient)",
    )
    lam: float = Field(1.0, ge=0, description="lambda, the weight of the regulariser")
    lam_warmup_steps: int = Field(
        10, ge=0, description="lambda grows linearly from lam/steps to lam over this many steps"
    )
    layers: str | list[int] = Field(
        "last5", description="MoE layers to tune: all | lastN | a list of layer indices, e.g. 3,4,5"
    )
    token: Literal["last", "first", "middle"] = Field(
        "last", description="the prompt token whose routing is regularised"
    )

    epochs: int = Field(
        3, ge=1, description="passes over the data", json_schema_extra=_section("Optimisation")
    )
    max_steps: int | None = Field(
        None, ge=1, description="stop after this many optimiser steps (unset: run all epochs)"
    )
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (router parameters only)")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay (0: decaying routers toward zero is not wanted)"
    )
    grad_clip: float | None = Field(
        1.0, gt=0, description="max gradient norm over the routers (unset: no clipping)"
    )
    batch_size: int = Field(
        8, ge=1, description="samples per step (all their choices go in one forward pass)"
    )
    seed: int = Field(0, description="random seed")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="training dtype; the patch keeps the checkpoint's dtype"
    )
    device: str = Field("cpu", description="torch device to train on: cpu, cuda, cuda:1, ...")
    embedder: str | None = Field(
        None,
        description="sentence-transformers id or path (unset: the packaged all-MiniLM-L6-v2)",
    )
    embed_batch_size: int = Field(64, ge=1, description="prompts per batch of the embedder")

    hidden_cache: HiddenCacheMode = Field(
        "memory",
        description="keep the hidden states entering the first tuned layer per sequence and run "
        "only the tuned layers at every step; disk also saves them under hidden_cache_dir for "
        "later runs on the same model and data",
    )
    hidden_cache_dir: Path | None = Field(
        None, description="disk mode's folder (unset: $ROMA_CACHE_DIR/hidden-states)"
    )

    @field_validator("objective")
    @classmethod
    def _check_objective(cls, value: str) -> str:
        objectives.get(value)
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        try:
            torch.device(value)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{value!r} is not a torch device ({exc})") from None
        return value

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
    """The default config file (or ``path``) with ``overrides`` on top: None values are not
    given, :data:`NULL` sets a key to null, a dotted key (``columns.prompt``) a nested one."""
    values = read_config_file(path if path is not None else DEFAULT_CONFIG)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        target = values
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{key}: {parent!r} is not a mapping in the config file")
        target[leaf] = None if value is NULL else value
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid training config: {problems}") from exc


# -- documentation: flag help and the default YAML, from the fields -------------------------------


def field_choices(info: FieldInfo) -> list[str]:
    """The values a field takes when it is a choice (a Literal, or the registered objectives)."""
    if get_origin(info.annotation) is Literal:
        return [str(arg) for arg in get_args(info.annotation)]
    extra = info.json_schema_extra
    return list(extra.get("choices", [])) if isinstance(extra, dict) else []


def field_help(info: FieldInfo) -> str:
    """A field's description, after its choices when it has some (``knn | eps | random: ...``)."""
    choices = field_choices(info)
    description = info.description or ""
    return f"{' | '.join(choices)}: {description}" if choices else description


def field_section(info: FieldInfo) -> dict[str, Any] | None:
    """The section a field opens (``{"section", "notes"}``), if it is the first of a group."""
    extra = info.json_schema_extra
    return extra if isinstance(extra, dict) and "section" in extra else None


def nested_model(info: FieldInfo) -> type[BaseModel] | None:
    """The model of a nested field (``columns``), else None."""
    annotation = info.annotation
    return (
        annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    )


def render_yaml() -> str:
    """The default config as YAML, each key with its help as a comment: the text of the shipped
    ``configs/roma_default.yaml``."""
    lines = [
        "# RoMA router-only fine-tuning: the default recipe (roma-train train --config this-file).",
        "# Every key can be overridden on the command line (--lr 5e-4, --layers last3,",
        "# --columns.prompt question, --grad-clip none). Written from the fields of",
        "# roma_trainer.config.TrainConfig by `python -m roma_trainer.config`: edit those.",
    ]
    lines += _yaml_fields(TrainConfig, TrainConfig().model_dump(mode="json"), "")
    return "\n".join(lines) + "\n"


def _yaml_fields(model: type[BaseModel], values: dict[str, Any], indent: str) -> list[str]:
    lines: list[str] = []
    for name, info in model.model_fields.items():
        section = field_section(info)
        if section is not None:
            lines += ["", f"# {section['section']}", *(f"# {n}" for n in section["notes"])]
        nested = nested_model(info)
        if nested is None:
            lines += _commented(f"{indent}{name}: {_yaml_scalar(values[name])}", info, indent)
        else:
            lines += _commented(f"{indent}{name}:", info, indent)
            lines += _yaml_fields(nested, values[name], indent + "  ")
    return lines


def _commented(code: str, info: FieldInfo, indent: str) -> list[str]:
    """``code  # help`` when it fits on one line, else the help wrapped above the code."""
    text = field_help(info)
    inline = f"{code:<{max(_COMMENT_COLUMN, len(code) + 2)}}# {text}"
    if len(inline) <= _WIDTH:
        return [inline]
    wrapped = textwrap.wrap(text, _WIDTH - len(indent) - 2)
    return [*(f"{indent}# {line}" for line in wrapped), code]


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("...\n").strip()


if __name__ == "__main__":
    sys.stdout.write(render_yaml())
