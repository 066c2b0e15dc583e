"""``roma-serve``: the gateway, plus (when not given URLs) a vLLM engine and a Redis of its own.

With nothing set it serves the embedded tiny OLMoE on the CPU: an engine child process on
loopback, a local Redis with append-only persistence under ~/.cache/roma/redis, and the gateway
on http://127.0.0.1:8000. SIGTERM or Ctrl-C stops the gateway, then the engine, then Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
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


@app.command()
def serve(
    model: Annotated[
        str | None,
        typer.Option(
            help="Hugging Face model id or local checkpoint dir for the engine it starts "
            "(default: the embedded tiny OLMoE). Env: ROMA_MODEL."
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
        typer.Option(help="drain (default): no request sees two router versions; immediate."),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING...")] = None,
) -> None:
    """Serve OpenAI completions and hot-swap router patches (POST /routers).

    Every option also reads from a ROMA_* environment variable; the admin token only from
    ROMA_ADMIN_TOKEN (never on the command line, where ps shows it). Unset, one is generated
    and printed.
    """
    overrides: dict[str, Any] = {
        "model": model,
        "engine_urls": engine_url,
        "redis_url": redis_url,
        "host": host,
        "port": port,
        "swap_policy": swap_policy,
        "log_level": log_level,
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    from roma_service.logging import configure_logging

    configure_logging(settings.log_level, settings.log_json)
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
    raise typer.Exit(run(settings))


def run(settings: Settings) -> int:
    """Start what is missing, serve until SIGTERM/SIGINT, stop what was started."""
    from roma_service.engine.process import EngineOptions, EngineProcess
    from roma_service.gateway import create_app
    from roma_service.registry import LocalRedis

    redis: LocalRedis | None = None
    engine: EngineProcess | None = None
    try:
        redis_url = settings.redis_url
        if not redis_url:
            redis = LocalRedis(settings.redis_dir).start()
            redis_url = redis.url
        engine_urls = list(settings.engine_urls)
        if not engine_urls:
            engine = EngineProcess(EngineOptions(model=_model(settings), port=settings.engine_port))
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


def _model(settings: Settings) -> str:
    if settings.model:
        return settings.model
    from roma_models import default_model_dir

    return str(Path(default_model_dir()))


if __name__ == "__main__":  # python -m roma_service.cli (same as the roma-serve script)
    app()
