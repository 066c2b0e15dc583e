"""``roma-train train``'s flags, made from :class:`TrainConfig`'s fields: one source for both.

Field ``name`` becomes ``--name`` (underscores as dashes); a nested field gets a dotted flag
(``--columns.prompt-template``); the help is the field's description after its choices, in the
panel of the field's section, with the shipped default. Every flag defaults to None, "not
given": the config file's value stands. Optional numbers take ``none`` to unset them
(``--grad-clip none``: no clipping). Values are checked by the config (exit 2 with the reason).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from roma_trainer.config import (
    NULL,
    TrainConfig,
    field_choices,
    field_help,
    field_section,
    nested_model,
)

# Flag names besides the generated one, kept because users and the README know them.
ALIASES: dict[str, tuple[str, ...]] = {"lam": ("--lambda",)}
_NESTED = "__"  # python parameter names of nested fields: columns__prompt


@dataclass(frozen=True)
class Flag:
    """One config key's command-line option."""

    key: str  # the config key, dotted when nested: columns.prompt
    info: FieldInfo
    panel: str | None

    @property
    def name(self) -> str:
        return f"--{self.key.replace('_', '-')}"

    @property
    def parameter(self) -> inspect.Parameter:
        """The typer parameter: ``Annotated[type | None, typer.Option(...)] = None``."""
        kind, nullable = _value_type(self.info)
        names = [self.name, *ALIASES.get(self.key, ())]
        extra: dict[str, Any] = {}
        if kind is bool:
            names = [f"{self.name}/--no-{self.name.removeprefix('--')}"]
        elif nullable and kind in (int, float):
            extra = {"parser": _nullable(kind), "metavar": f"{kind.__name__.upper()}|none"}
        option = typer.Option(
            *names, help=_help(self.info), show_default=False, rich_help_panel=self.panel, **extra
        )
        name = self.key.replace(".", _NESTED)
        annotation = Annotated[kind | None, option]  # type: ignore[valid-type]
        return inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
        )


def config_flags(
    model: type[BaseModel] = TrainConfig, prefix: str = "", panel: str | None = None
) -> Iterator[Flag]:
    """Every field's flag, nested models' fields included (dotted), in field order."""
    for name, info in model.model_fields.items():
        section = field_section(info)
        panel = section["section"] if section else panel
        nested = nested_model(info)
        if nested is None:
            yield Flag(prefix + name, info, panel)
        else:
            yield from config_flags(nested, f"{prefix}{name}.", panel)


def with_config_flags(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` (whose last parameter is ``**fields``) a flag per config key, as
    keyword-only parameters that typer reads from its signature."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    params = [*own, *(flag.parameter for flag in config_flags())]
    command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return command


def overrides(values: dict[str, Any]) -> dict[str, Any]:
    """The flags' values (python parameter name -> value) as ``load_config`` overrides."""
    return {name.replace(_NESTED, "."): value for name, value in values.items()}


def _value_type(info: FieldInfo) -> tuple[type, bool]:
    """The flag's value type, and whether the field takes null."""
    args = get_args(info.annotation) if get_origin(info.annotation) is not Literal else ()
    nullable = type(None) in args
    kinds = [a for a in args if a is not type(None)] or [info.annotation]
    kind = kinds[0] if len(kinds) == 1 else str  # layers: "last5" or "3,4,5" from a flag
    return (kind if kind in (bool, int, float, Path) else str), nullable  # choices: str


def _nullable(kind: type) -> Callable[[str], Any]:
    """A value parser for an optional number: ``none`` is :data:`NULL`."""

    def parse(text: str) -> Any:
        if text.lower() in ("none", "null"):
            return NULL
        try:
            return kind(text)
        except ValueError:
            raise typer.BadParameter(f"{text!r} is not a {kind.__name__} (or 'none')") from None

    return parse


def _help(info: FieldInfo) -> str:
    """The field's help as a sentence, with the shipped default (flags themselves default to
    None, "not given")."""
    text = field_help(info)
    if not field_choices(info):
        text = text[:1].upper() + text[1:]
    default = info.get_default(call_default_factory=True)
    if default is not None and not isinstance(default, bool):
        text += f" (default: {default if default != '' else repr(default)})"
    return text if text.endswith(".") else text + "."
