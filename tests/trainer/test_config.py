"""TrainConfig is the one source of the recipe's options: every field is described, has a
``roma-train train`` flag and a line in the shipped YAML; overrides (dotted, null) land where
they should."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import typer
from pydantic import BaseModel

from roma_trainer import objectives
from roma_trainer.cli import app
from roma_trainer.config import (
    DEFAULT_CONFIG,
    NULL,
    ConfigError,
    TrainConfig,
    load_config,
    read_config_file,
    render_yaml,
)


def config_keys(model: type[BaseModel] = TrainConfig, prefix: str = "") -> Iterator[str]:
    """Every leaf key of the config, nested ones dotted (columns.prompt)."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from config_keys(annotation, f"{prefix}{name}.")
        else:
            yield prefix + name


def train_options() -> dict[str, click.Option]:
    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    return {opt: p for p in command.params for opt in p.opts + p.secondary_opts}


def test_every_config_key_has_a_described_flag() -> None:
    options = train_options()
    for key in config_keys():
        flag = f"--{key.replace('_', '-')}"
        assert flag in options, f"{key} has no flag {flag}"
        assert options[flag].help and len(options[flag].help) > 10, key
        assert options[flag].default is None, f"{flag} must default to 'not given'"


def test_flags_kept_from_before() -> None:
    options = train_options()
    for flag in ("--lambda", "--lam", "-c", "--config", "--push", "--no-trust-remote-code"):
        assert flag in options, flag
    assert options["--lambda"] is options["--lam"]


def test_objective_help_and_choices_come_from_the_registry() -> None:
    help_text = train_options()["--objective"].help
    assert help_text.startswith(" | ".join(objectives.REGISTRY) + ":")
    assert list(objectives.REGISTRY) == ["manifold", "ce", "l1", "l2", "entropy"]


def test_shipped_yaml_is_rendered_from_the_config() -> None:
    """If this fails: python -m roma_trainer.config > trainer/configs/roma_default.yaml"""
    text = DEFAULT_CONFIG.read_text()
    assert text == render_yaml()
    assert TrainConfig.model_validate(read_config_file(DEFAULT_CONFIG)) == TrainConfig()
    for key in config_keys():
        assert f"{key.split('.')[-1]}:" in text, key
    for objective in objectives.REGISTRY.values():
        assert f"#   {objective.name:<9} {objective.summary}\n" in text


def test_overrides_null_and_dotted_keys(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("grad_clip: 2.0\ncolumns: {prompt: q, answer: a}\nsigma: 0.3\n")
    cfg = load_config(config, {"grad_clip": NULL, "columns.answer": "label", "sigma": None})
    assert cfg.grad_clip is None  # NULL unsets
    assert cfg.sigma == 0.3  # None: not given
    assert (cfg.columns.prompt, cfg.columns.answer) == ("q", "label")
    config.write_text("columns: 5\n")
    with pytest.raises(ConfigError, match="'columns' is not a mapping"):
        load_config(config, {"columns.prompt": "q"})


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"device": "nonsense"}, "device: Value error, 'nonsense' is not a torch device"),
        ({"grad_clip": 0}, "grad_clip: Input should be greater than 0"),
        ({"objective": "magic"}, "unknown objective 'magic': choose one of manifold | ce"),
        ({"columns.prompt_templat": "x"}, "columns.prompt_templat: Extra inputs"),
    ],
)
def test_bad_values_are_config_errors(values: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("|", r"\|")):
        load_config(None, values)
