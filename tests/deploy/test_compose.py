"""docker-compose.yml (and the CPU override) as Docker Compose itself resolves them.

Docker cannot run here, so these tests check what `docker compose up` would be given: the
services, who may be reached from outside, GPU reservations, health checks and start order.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from roma_service.settings import Settings
from tests.deploy.support import (
    COMPOSE,
    COMPOSE_CPU,
    ROOT,
    TEST_TOKEN,
    VARIANTS,
    load_yaml,
    resolved,
    run_compose,
)

LONG_RUNNING = ("redis", "engine", "gateway")
GPU_SERVICES = ("engine", "trainer")


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


def test_compose_files_are_valid_for_docker_compose(variant: str) -> None:
    result = run_compose(VARIANTS[variant], "--profile", "train", "config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_the_services(variant: str) -> None:
    services = resolved(variant)["services"]
    assert set(services) == {"redis", "engine", "gateway", "trainer"}


def test_trainer_only_runs_under_the_train_profile(variant: str) -> None:
    assert resolved(variant)["services"]["trainer"]["profiles"] == ["train"]
    default = run_compose(VARIANTS[variant], "config", "--services")
    assert default.returncode == 0, default.stderr
    assert set(default.stdout.split()) == {"redis", "engine", "gateway"}


def test_compose_refuses_to_start_without_an_admin_token() -> None:
    result = run_compose(VARIANTS["gpu"], "config", "--quiet", env={})
    assert result.returncode != 0
    assert "ROMA_ADMIN_TOKEN" in result.stderr and ".env.example" in result.stderr


def test_only_the_gateway_publishes_a_port(variant: str) -> None:
    services = resolved(variant)["services"]
    published = {name for name, svc in services.items() if svc.get("ports")}
    assert published == {"gateway"}
    assert [p["target"] for p in services["gateway"]["ports"]] == [8000]
    for name, svc in services.items():
        assert svc.get("network_mode") != "host", name


def test_engine_dev_mode_routes_stay_on_the_compose_network(variant: str) -> None:
    """VLLM_SERVER_DEV_MODE exposes unauthenticated admin routes: the engine that turns it on
    must publish nothing, and must not even hold the admin token."""
    engine = resolved(variant)["services"]["engine"]
    assert engine["environment"]["VLLM_SERVER_DEV_MODE"] == "1"
    assert "ports" not in engine
    assert engine["expose"] == ["8000"]
    assert "ROMA_ADMIN_TOKEN" not in engine["environment"]


def test_health_checks(variant: str) -> None:
    services = resolved(variant)["services"]
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert not check.get("disable"), name
    assert "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"])
    assert "127.0.0.1:8000/health" in " ".join(services["engine"]["healthcheck"]["test"])
    assert "127.0.0.1:8000/health" in " ".join(services["gateway"]["healthcheck"]["test"])


def test_gateway_starts_after_engine_and_redis_are_healthy(variant: str) -> None:
    depends = resolved(variant)["services"]["gateway"]["depends_on"]
    assert {name: dep["condition"] for name, dep in depends.items()} == {
        "engine": "service_healthy",
        "redis": "service_healthy",
    }


def test_gpu_reservations() -> None:
    gpu = resolved("gpu")["services"]
    for name in GPU_SERVICES:
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}], name
    for name in ("redis", "gateway"):
        assert "deploy" not in gpu[name], name
    cpu = resolved("cpu")["services"]
    for name in cpu:
        assert "deploy" not in cpu[name], f"{name} still reserves a device on the CPU variant"


def test_cpu_variant_builds_the_cpu_images() -> None:
    services = resolved("cpu")["services"]
    assert services["engine"]["build"]["dockerfile"] == "deploy/cpu/engine.Dockerfile"
    assert services["trainer"]["build"]["args"]["TORCH_SPEC"] == "torch==2.13.0+cpu"
    assert services["trainer"]["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")


def test_engine_model_and_hugging_face_cache(variant: str) -> None:
    engine = resolved(variant)["services"]["engine"]
    assert engine["environment"]["ROMA_MODEL"] == "allenai/OLMoE-1B-7B-0924"
    cache = engine["environment"]["HF_HOME"]
    mounts = {m["target"]: m for m in engine["volumes"]}
    assert mounts[cache]["type"] == "volume" and mounts[cache]["source"] == "hf-cache"
    assert "hf-cache" in resolved(variant)["volumes"]


def test_model_is_taken_from_roma_model() -> None:
    result = run_compose(
        VARIANTS["gpu"],
        "config",
        "--format",
        "json",
        env={"ROMA_ADMIN_TOKEN": TEST_TOKEN, "ROMA_MODEL": "Qwen/Qwen3-30B-A3B"},
    )
    assert result.returncode == 0, result.stderr
    assert '"ROMA_MODEL": "Qwen/Qwen3-30B-A3B"' in result.stdout


def test_gateway_settings_resolve_to_the_compose_services(variant: str) -> None:
    """The gateway's environment, read by the real Settings class, points at the engine and
    Redis services and listens on all interfaces of its container."""
    services = resolved(variant)["services"]
    env = services["gateway"]["environment"]
    settings = Settings(
        **{
            k.removeprefix("ROMA_").lower(): v
            for k, v in env.items()
            if k.startswith("ROMA_") and k.removeprefix("ROMA_").lower() in Settings.model_fields
        }
    )
    assert settings.engine_urls == ["http://engine:8000"]
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.admin_token_value() == TEST_TOKEN
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    for url in [*settings.engine_urls, settings.redis_url]:
        host = re.match(r"^\w+://([^:/]+)", url).group(1)
        assert host in services, f"{url} names no compose service"


def test_redis_persistence(variant: str) -> None:
    redis = resolved(variant)["services"]["redis"]
    mounts = {m["target"]: m for m in redis["volumes"]}
    assert mounts["/data"]["type"] == "volume"
    conf_mount = next(m for m in redis["volumes"] if m["target"].endswith("redis.conf"))
    assert conf_mount["type"] == "bind" and conf_mount.get("read_only")
    assert conf_mount["target"] in redis["command"]
    conf = dict(
        line.split(None, 1)
        for line in Path(conf_mount["source"]).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert conf["appendonly"] == "yes"
    assert conf["dir"] == "/data"
    assert conf["maxmemory-policy"] == "noeviction"


def test_every_referenced_file_exists(variant: str) -> None:
    for name, svc in resolved(variant)["services"].items():
        if "build" in svc:
            context = Path(svc["build"]["context"])
            assert context.is_dir(), name
            assert (context / svc["build"]["dockerfile"]).is_file(), name
        for mount in svc.get("volumes", []):
            source = Path(mount.get("source", ""))
            # Bind mounts of files must exist; a missing folder (./data, ./runs) is created.
            if mount["type"] == "bind" and source.suffix:
                assert source.is_file(), f"{name}: {source}"
        for env_file in svc.get("env_file", []):
            if env_file.get("required", True):
                assert Path(env_file["path"]).is_file(), f"{name}: {env_file['path']}"


def test_images_are_pinned(variant: str) -> None:
    for name, svc in resolved(variant)["services"].items():
        image = svc["image"]
        assert ":" in image.rsplit("/", 1)[-1] or "@sha256:" in image, f"{name}: {image} untagged"
        tag = image.rsplit("/", 1)[-1].split("@")[0].partition(":")[2]
        assert tag and tag != "latest", f"{name}: {image}"
        if "build" not in svc:
            # Pulled images: pinned by digest as well, so a re-pushed tag cannot change them.
            assert re.search(r"@sha256:[0-9a-f]{64}$", image), f"{name}: {image}"


def test_override_file_resets_rather_than_merges_the_gpu_reservation() -> None:
    """Compose merges mappings: without `!reset`, the CPU override would keep the GPU
    reservation and `up` would fail on hosts without the NVIDIA runtime."""
    override = load_yaml(COMPOSE_CPU)["services"]
    for name in GPU_SERVICES:
        assert override[name]["deploy"]["__tag__"] == "!reset", name
    base = load_yaml(COMPOSE)["services"]
    assert all("deploy" in base[name] for name in GPU_SERVICES)
    assert ROOT.joinpath(".env.example").is_file()
