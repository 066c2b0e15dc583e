"""``roma-serve``: the gateway, plus (when not given URLs) a vLLM engine and a Redis of its own.

With nothing set it serves the embedded default, smollm2-moe (SmolLM2-135M-Instruct MoEfied,
built into the models folder on first use, about 2 minutes), on the CPU: an engine child process on
loopback, a local Redis with append-only persistence, and the gateway on http://127.0.0.1:8000.
Its state lives in ROMA_CACHE_DIR (default ~/.cache/roma): redis/ (every router version; locked,
one instance per folder) and logs/engine-<port>.log. Options roma-serve does not know are
passed to the vLLM engine (--max-model-len, --chat-template, --dtype...). SIGTERM or Ctrl-C
stops the gateway, then the engine, then Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import shlex
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
import uvicorn
from pydantic import SecretStr

from roma_service.settings import Settings, SwapPolicy

log = logging.getLogger("roma_service.cli")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help=__doc__,
    rich_markup_mode=None,
)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option(
            help="Hugging Face model id or local checkpoint dir for the engine it starts "
            "(default: smollm2-moe, built on first use into $ROMA_MODELS_DIR). Env: ROMA_MODEL."
        ),
    ] = None,
    served_model_name: Annotated[
        str | None,
        typer.Option(
            help='Name clients put in "model" (default: the hub id, or the local folder\'s '
            "name). Env: ROMA_SERVED_MODEL_NAME."
        ),
    ] = None,
    engine_url: Annotated[
        list[str] | None,
        typer.Option(
            help="URL of a running engine (repeat for several); none = start one. "
            "Env: ROMA_ENGINE_URLS (comma-separated)."
        ),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(help="Redis URL; none = start a local redis-server. Env: ROMA_REDIS_URL."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default: 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: 8000).")] = None,
    swap_policy: Annotated[
        SwapPolicy | None,
        typer.Option(
            help="auto (default): slots when the engines keep several router versions "
            "resident (per-request versions, canaries, deploys without drain); drain or "
            "immediate: one global version swapped in place."
        ),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING...")] = None,
    reset_state: Annotated[
        bool,
        typer.Option(
            "--reset-state",
            help="Delete the local Redis data first (every router version and its history, in "
            "ROMA_CACHE_DIR/redis); refused while another instance uses that folder.",
        ),
    ] = False,
) -> None:
    """Serve OpenAI completions and hot-swap router patches (POST /routers).

    Every option also reads from a ROMA_* environment variable; the admin token only from
    ROMA_ADMIN_TOKEN and client keys only from ROMA_API_KEYS (never on the command line, where
    ps shows them). Unset, an admin token is generated and printed. Any other option is passed
    to the vLLM engine roma-serve starts (e.g. --max-model-len 4096).
    """
    overrides: dict[str, Any] = {
        "model": model,
        "served_model_name": served_model_name,
        "engine_urls": engine_url,
        "redis_url": redis_url,
        "host": host,
        "port": port,
        "swap_policy": swap_policy,
        "log_level": log_level,
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    if ctx.args:
        extra = f"{settings.engine_extra_args} {shlex.join(ctx.args)}".strip()
        settings = settings.model_copy(update={"engine_extra_args": extra})
    from roma_service.logging import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    if problem := _refusal(settings, ctx.args, reset_state):
        typer.secho(f"roma-serve: {problem}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    if reset_state:
        from roma_service.registry.local import FolderInUse, LocalRedis

        try:
            removed = LocalRedis.reset(settings.local_redis_dir())
        except FolderInUse as exc:
            typer.secho(f"roma-serve: --reset-state: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        names = ", ".join(p.name for p in removed) or "nothing there"
        typer.echo(f"reset: removed {names} from {settings.local_redis_dir()}", err=True)
    if not settings.admin_token_value():
        token = secrets.token_urlsafe(24)
        settings = settings.model_copy(update={"admin_token": SecretStr(token)})
        typer.secho(
            f"ROMA_ADMIN_TOKEN was not set; this run's admin token is:\n  {token}\n"
            f"(curl -H 'Authorization: Bearer {token}' http://{settings.host}:{settings.port}"
            "/routers)",
            fg=typer.colors.YELLOW,
            err=True,
        )
    typer.echo(_where_state_lives(settings), err=True)
    if not settings.api_keys and not _loopback(settings.host):
        log.warning(
            "the OpenAI routes are open to anyone who reaches this address; set ROMA_API_KEYS",
            extra={"host": settings.host},
        )
    raise typer.Exit(run(settings))


def _refusal(settings: Settings, engine_args: list[str], reset_state: bool) -> str | None:
    """Settings that cannot work together, said before anything starts. ``engine_args`` are
    the command line's options for the engine (ROMA_ENGINE_EXTRA_ARGS, like ROMA_MODEL, is
    simply unused in front of running engines: compose gives it to every container)."""
    if any(arg.split("=")[0] == "--api-key" for arg in shlex.split(settings.engine_extra_args)):
        return (
            "--api-key would lock the gateway out of its own engine; put client keys in "
            "ROMA_API_KEYS (checked by the gateway)"
        )
    if engine_args and settings.engine_urls:
        return f"engine options {engine_args} need the engine roma-serve starts, not --engine-url"
    if reset_state and settings.redis_url:
        return (
            f"--reset-state clears the local Redis folder, but this instance uses "
            f"{settings.redis_url}: activate version 0 there (POST /routers/0/activate) or "
            "choose another ROMA_REDIS_PREFIX"
        )
    return None


def _where_state_lives(settings: Settings) -> str:
    if settings.redis_url:
        registry = f"router versions in {settings.redis_url} (prefix {settings.redis_prefix!r})"
    else:
        registry = f"router versions in {settings.local_redis_dir()} (local Redis)"
    engine = "" if settings.engine_urls else f"; engine log {settings.engine_log_path()}"
    return f"state: {registry}{engine}"


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(settings: Settings) -> int:
    """Start what is missing, serve until SIGTERM/SIGINT, stop what was started."""
    from roma_service.engine.process import EngineOptions, EngineProcess
    from roma_service.gateway import create_app
    from roma_service.registry import LocalRedis
    from roma_service.registry.local import FolderInUse

    redis: LocalRedis | None = None
    engine: EngineProcess | None = None
    try:
        redis_url = settings.redis_url
        if not redis_url:
            redis = LocalRedis(settings.local_redis_dir())
            try:
                redis.start()
            except FolderInUse as exc:
                typer.secho(f"roma-serve: {exc}", fg=typer.colors.RED, err=True)
                return 2
            redis_url = redis.url
        engine_urls = list(settings.engine_urls)
        if not engine_urls:
            model = _model(settings)
            options = EngineOptions(
                model=model,
                port=settings.engine_port,
                served_model_name=settings.served_model_name or served_model_name(model),
                extra_args=shlex.split(settings.engine_extra_args),
                log_path=settings.engine_log_path(),
            )
            engine = EngineProcess(options)
            engine.start()
            engine_urls = [engine.url]
            log.info("engine starting", extra={"url": engine.url, "log": str(engine.log_path)})
        gateway = create_app(settings, redis_url, engine_urls)
        config = uvicorn.Config(
            gateway, host=settings.host, port=settings.port, log_config=None, access_log=False
        )
        server = uvicorn.Server(config)
        # uvicorn's loop factory: uvloop when installed, as `uvicorn.run` would pick.
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            return runner.run(_serve(server, engine, settings.engine_startup_timeout_s))
    finally:
        if engine is not None:
            engine.stop()
        if redis is not None:
            redis.stop()


async def _serve(server: uvicorn.Server, engine: Any, startup_timeout_s: float) -> int:
    """Serve until SIGTERM/SIGINT, then return so that the caller stops the children.

    uvicorn's own signal capture re-raises the signal after shutting down, which would kill
    this process before it stops the engine and Redis; so the signals are ours. A child engine
    that dies makes the gateway exit too (with its log tail) instead of staying up unready."""
    loop = asyncio.get_running_loop()
    stopped: list[int] = []

    def stop(signum: int) -> None:
        stopped.append(signum)
        server.should_exit = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    watchdog = None
    if engine is not None:
        watchdog = asyncio.create_task(_watch(server, engine, startup_timeout_s))
    try:
        await server.serve()
    finally:
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
    log.info("gateway stopped", extra={"signal": stopped[0] if stopped else None})
    if engine is not None and not stopped and not engine.running:
        return 1
    return 0


async def _watch(server: uvicorn.Server, engine: Any, startup_timeout_s: float) -> None:
    """Stop serving if the child engine never becomes healthy, or exits later."""
    from roma_service.engine.errors import EngineStartError

    try:
        await engine.await_healthy(startup_timeout_s)
    except EngineStartError as exc:
        log.error("engine did not start", extra={"error": exc.message, "log": str(engine.log_path)})
        server.should_exit = True
        return
    while engine.running:
        await asyncio.sleep(1.0)
    log.error("engine exited", extra={"log": str(engine.log_path), "tail": engine.log_tail(20)})
    server.should_exit = True


def served_model_name(model: str) -> str:
    """The name clients use when none is set: a hub id as it is, a local folder by its name
    (an absolute path would leak the host's layout into every client's config)."""
    path = Path(model).expanduser()
    return path.name if path.is_dir() else model


def _model(settings: Settings) -> str:
    if settings.model:
        return settings.model
    from roma_models import default_model_dir

    return str(Path(default_model_dir()))


if __name__ == "__main__":  # python -m roma_service.cli (same as the roma-serve script)
    app()
