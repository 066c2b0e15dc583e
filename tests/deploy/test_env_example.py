""".env.example: every setting listed, nothing stale, and the defaults it documents true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from roma_service.settings import Settings
from tests.deploy.support import COMPOSE, COMPOSE_CPU, ENV_EXAMPLE, ROOT

# `NAME=value` lines, active or commented out (commented = documented default).
LINE = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")
ENTRYPOINT = ROOT / "deploy/engine-entrypoint.sh"
# Documented with the value compose gives them, not Settings' default (embedded mode).
COMPOSE_VALUES = {"engine_urls", "redis_url"}
# Defaults computed at run time (home folder, host name).
COMPUTED = {"redis_dir", "cache_dir", "gateway_id"}


def _entries() -> dict[str, tuple[bool, str]]:
    """name -> (active, value) for every variable line of .env.example."""
    entries: dict[str, tuple[bool, str]] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = LINE.match(line.strip())
        if match:
            assert match.group(2) not in entries, f"{match.group(2)} listed twice"
            entries[match.group(2)] = (match.group(1) is None, match.group(3))
    return entries


def _referenced_in_deploy_files() -> set[str]:
    text = "\n".join(p.read_text() for p in (COMPOSE, COMPOSE_CPU, ENTRYPOINT))
    return set(re.findall(r"\$\{?(ROMA_[A-Z0-9_]+)", text))


def test_every_line_is_a_comment_or_a_variable() -> None:
    for number, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        stripped = line.strip()
        assert not stripped or stripped.startswith("#") or LINE.match(stripped), (
            f".env.example:{number}: {line!r}"
        )


def test_every_settings_field_is_listed() -> None:
    entries = _entries()
    missing = [
        f"ROMA_{name.upper()}"
        for name in Settings.model_fields
        if f"ROMA_{name.upper()}" not in entries
    ]
    assert not missing, f"add to .env.example: {missing}"


def test_every_variable_the_deploy_files_read_is_listed() -> None:
    missing = _referenced_in_deploy_files() - set(_entries())
    assert not missing, f"add to .env.example: {sorted(missing)}"


def test_nothing_stale() -> None:
    """Each ROMA_ variable listed is read by the gateway or by the deploy files."""
    known = {f"ROMA_{name.upper()}" for name in Settings.model_fields} | (
        _referenced_in_deploy_files()
    )
    stale = {name for name in _entries() if name.startswith("ROMA_")} - known
    assert not stale, f"nothing reads {sorted(stale)}"


def test_no_secret_ships_with_a_value() -> None:
    active, value = _entries()["ROMA_ADMIN_TOKEN"]
    assert active and value == "", "the admin token must be chosen by whoever deploys"
    assert _entries().get("HF_TOKEN", (False, ""))[1] == ""


@pytest.mark.parametrize(
    "field",
    sorted(set(Settings.model_fields) - COMPOSE_VALUES - COMPUTED - {"admin_token", "model"}),
)
def test_documented_default_is_the_real_default(
    field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commented `# ROMA_X=value` claims a default: Settings must read that value as its
    own default (so the file never lies about what happens when a line stays commented)."""
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"ROMA_{name.upper()}", raising=False)
    active, value = _entries()[f"ROMA_{field.upper()}"]
    assert not active, f"ROMA_{field.upper()} is set in .env.example; comment it out"
    monkeypatch.setenv(f"ROMA_{field.upper()}", value)
    assert getattr(Settings(), field) == Settings.model_fields[field].get_default(
        call_default_factory=True
    )


def test_example_env_loads_into_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The active lines (with a token filled in) make a valid gateway configuration."""
    for name, (active, value) in _entries().items():
        if active and name.startswith("ROMA_"):
            monkeypatch.setenv(name, value or "x")
    settings = Settings()
    assert settings.model == "allenai/OLMoE-1B-7B-0924"
    assert settings.admin_token_value() == "x"


def test_dotenv_is_git_ignored() -> None:
    ignored = Path(ROOT / ".gitignore").read_text().split()
    assert ".env" in ignored
