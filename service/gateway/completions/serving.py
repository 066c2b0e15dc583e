"""The completions proxy: pick an engine, pass the request through, stream the answer back.

Slot mode (the engines keep several router versions resident): each completion is bound to one
version as it comes in: the one its ``X-Router-Version`` header asks for, else the canary split's
choice for its caller, else the active one. The body gets that version in vLLM's per-request
channel and a per-version prefix-cache salt (``engine.binding``; a client cannot set either),
and goes to an engine holding the version (loaded into a slot first if none does). The response
is generated under that version from its first token to its last.

Global mode (``drain`` / ``immediate``): bodies go through untouched. Under ``drain`` each
request holds a reader slot of the swap gate until its last byte is out. Each request notes the
engine's swap generation as it goes in; if a swap started, ended or was under way between then
and its last byte, the response may mix router versions and says so.

SSE chunks are forwarded as they arrive, never buffered.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from roma_service.engine.admission import NOT_RESIDENT
from roma_service.engine.binding import bind_request
from roma_service.gateway.completions.protocol import (
    CHANGED_HEADER,
    DONE,
    VERSION_HEADER,
    changed_comment,
    version_comment,
)
from roma_service.gateway.engines import EngineHandle, NoEngine, Stamp
from roma_service.gateway.errors import APIError, error_response, from_engine
from roma_service.gateway.gate import GateTimeout
from roma_service.gateway.state import Gateway
from roma_service.gateway.traffic import BadCaller, caller_key, choose
from roma_service.gateway.upload import read_body
from roma_service.logging import request_version

log = logging.getLogger(__name__)

_FORWARD_HEADERS = ("content-type", "accept", "user-agent", "x-request-id")
_RETURN_HEADERS = ("content-type", "x-request-id")
# Routes whose requests run under router weights, hence are bound to a version in slot mode.
_BOUND_ROUTES = ("completions", "chat_completions")
_MAX_VERSION = 2**62
# How often a request the engine refused as "version not resident" is routed again.
_STALE = 2


class _Release:
    """Runs the end-of-request bookkeeping exactly once, however the response ends."""

    def __init__(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._callback: Callable[[], Awaitable[None]] | None = callback

    async def __call__(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            await callback()


class _GuardedStream(StreamingResponse):
    """A StreamingResponse whose release also runs when the client is gone before the first
    byte (then the body generator never starts, and its ``finally`` would never run)."""

    def __init__(self, body: AsyncIterator[bytes], release: _Release, **kwargs: object) -> None:
        super().__init__(body, **kwargs)  # type: ignore[arg-type]
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._release()


class CompletionsProxy:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def model(self, request: Request, model_id: str) -> Response:
        """``GET /v1/models/{id}``, which vLLM does not serve: its model list, filtered."""
        listing = await self.forward(request, "/v1/models", "models")
        if listing.status_code != 200:
            return listing
        headers = {VERSION_HEADER: listing.headers[VERSION_HEADER]}
        for entry in json.loads(listing.body).get("data", []):
            if entry.get("id") == model_id:
                return JSONResponse(entry, headers=headers)
        message = f"the model {model_id!r} is not served here (GET /v1/models lists it)"
        return error_response(404, message, "not_found", "model", headers)

    async def forward(self, request: Request, path: str, route: str) -> Response:
        body = b""
        payload: dict | None = None
        if request.method == "POST":
            _require_json(request)
            body = await read_body(request, self.gw.settings.max_request_bytes)
            payload = _json_object(body)
        stream = payload is not None and _wants_stream(payload)
        requested = requested_version(request)
        pool = self.gw.pool
        bound: int | None = None
        if pool.slot_mode and payload is not None and route in _BOUND_ROUTES:
            bound = requested if requested is not None else self._choose(payload, request)
            try:
                bind_request(payload, bound)  # refuse a malformed vllm_xargs / cache_salt now
            except ValueError as exc:
                raise APIError(400, str(exc), "invalid_value") from exc
        elif requested is not None and not pool.slot_mode and requested != pool.active:
            raise APIError(
                409,
                f"router version {requested} was asked for, but this gateway serves one global "
                f"version ({pool.active}): per-request versions need engines with "
                "ROMA_ROUTER_SLOTS >= 2 and ROMA_SWAP_POLICY auto or slots",
                "slots_disabled",
                VERSION_HEADER,
            )
        drain = self.gw.settings.swap_policy == "drain" or (
            self.gw.settings.swap_policy == "auto" and pool.slot_mode is False
        )
        started = time.perf_counter()
        if drain:
            try:
                await self.gw.gate.acquire_read(self.gw.settings.drain_timeout_s)
            except GateTimeout as exc:
                retry = {"Retry-After": "1"}
                raise APIError(503, str(exc), "swap_in_progress", headers=retry) from exc
        engine: EngineHandle | None = None

        async def release() -> None:
            if engine is not None:
                engine.inflight -= 1
                if bound is not None:
                    engine.sending[bound] -= 1
                self.gw.metrics.engine_inflight.labels(engine.url).set(engine.inflight)
            if drain:
                await self.gw.gate.release_read()

        done = _Release(release)
        try:
            engine, upstream, stamp = await self._send(request, path, body, bound, payload)
        except BaseException:
            await done()
            raise
        version = stamp.version
        request_version.set(version)
        status = upstream.status
        headers = {k: v for k, v in upstream.headers.items() if k.lower() in _RETURN_HEADERS}
        headers[VERSION_HEADER] = str(version)

        def finish(status: int) -> bool:
            """Count the request; True when it spanned a swap."""
            labels = (route, str(version))
            self.gw.metrics.requests.labels(*labels, str(status)).inc()
            self.gw.metrics.latency.labels(*labels).observe(time.perf_counter() - started)
            changed = engine.changed_since(stamp)
            if changed:
                self.gw.metrics.version_changed.inc()
            return changed

        if not (stream and status == 200):
            try:
                content = await upstream.read()
            finally:
                upstream.release()
                await done()
            if finish(status):
                headers[CHANGED_HEADER] = f"{version}->{engine.now_serving(stamp)}"
            log.info("proxied", extra={"route": route, "status": status,
                                       "engine": engine.url})  # fmt: skip
            if status >= 400:  # the engine's refusal, in the gateway's shape
                error = from_engine(status, content)
                headers.pop("content-type", None)
                return JSONResponse(error, status, headers=headers)
            return Response(content, status, headers=headers)

        async def body_iter() -> AsyncIterator[bytes]:
            first = True
            try:
                # Whatever has arrived, at once: SSE events that came in together go out in one
                # write (the DONE event is looked for at the end of a read, as it is the last).
                async for chunk in upstream.content.iter_any():
                    if first:
                        first = False
                        self.gw.metrics.ttft.labels(str(version)).observe(
                            time.perf_counter() - started
                        )
                    if chunk.endswith(DONE):
                        if head := chunk[: -len(DONE)]:
                            yield head
                        yield self._trailer(stamp, engine)
                        yield DONE
                    else:
                        yield chunk
            finally:
                # A stream cut short (the client went away) closes the connection, which is
                # what tells the engine to stop generating; a finished one goes back to the pool.
                if upstream.content.at_eof():
                    upstream.release()
                else:
                    upstream.close()
                finish(200)
                await done()

        headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return _GuardedStream(
            body_iter(), done, status_code=200, headers=headers, media_type="text/event-stream"
        )

    def _trailer(self, stamp: Stamp, engine: EngineHandle) -> bytes:
        out = version_comment(stamp.version)
        if engine.changed_since(stamp):
            out += changed_comment(stamp.version, engine.now_serving(stamp))
        return out

    def _choose(self, payload: dict, request: Request) -> int:
        """The version of a request that did not ask for one: the canary split's choice for
        its caller, else the active version."""
        pool = self.gw.pool
        if pool.active is None:
            raise APIError(503, pool.why_not_ready(), "no_engine", headers={"Retry-After": "5"})
        if not pool.split:
            return pool.active
        try:
            return choose(pool.split, caller_key(payload, request.headers))
        except BadCaller as exc:
            raise APIError(400, exc.message, exc.code, exc.param) from exc

    async def _send(
        self,
        request: Request,
        path: str,
        body: bytes,
        bound: int | None = None,
        payload: dict | None = None,
    ) -> tuple[EngineHandle, aiohttp.ClientResponse, Stamp]:
        """Send to the least-loaded engine holding the request's version; an engine that
        refuses the connection goes out of rotation and the next one is tried (nothing reached
        the first one)."""
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARD_HEADERS}
        timeout = _upstream_timeout(self.gw.settings.request_timeout_s)
        params = request.query_params.multi_items() if request.scope["query_string"] else None
        tried: list[str] = []
        stale = 0  # answers "version not resident": another gateway evicted it meanwhile
        while len(tried) < len(self.gw.pool.engines):
            try:
                if bound is None:
                    engine = self.gw.pool.pick()
                else:
                    engine = await self.gw.residency.engine_for(bound)
                    engine.sending[bound] += 1
                    # The salt names the weights the engine holds for this version too.
                    bound_body = bind_request(payload or {}, bound, engine.weights_tag(bound))
                    body = json.dumps(bound_body).encode()
                # What the engine holds as the request goes in: a non-streamed answer's headers
                # only arrive once it is generated, too late to tell.
                stamp = engine.stamp(bound)
            except NoEngine as exc:
                raise APIError(503, str(exc), "no_engine", headers={"Retry-After": "5"}) from exc
            engine.inflight += 1
            self.gw.metrics.engine_inflight.labels(engine.url).set(engine.inflight)
            try:
                upstream = await self.gw.pool.http.request(
                    request.method,
                    engine.url + path,
                    data=body or None,
                    headers=headers,
                    params=params,
                    allow_redirects=False,
                    timeout=timeout,
                )
                self.gw.metrics.engine_requests.labels(engine.url).inc()
                if bound is not None and stale < _STALE and await _not_resident(upstream):
                    # Nothing was generated: route it again (the version is loaded anew).
                    stale += 1
                    engine.inflight -= 1
                    engine.sending[bound] -= 1
                    await self.gw.residency.not_resident(engine, bound)
                    continue
                return engine, upstream, stamp
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                engine.inflight -= 1
                if bound is not None:
                    engine.sending[bound] -= 1
                tried.append(engine.url)
                self.gw.pool.mark_down(engine, f"connection failed: {exc}")
                self.gw.sync.wake()
            except (aiohttp.ClientError, TimeoutError) as exc:
                engine.inflight -= 1
                if bound is not None:
                    engine.sending[bound] -= 1
                raise APIError(
                    502, f"engine {engine.url} failed: {type(exc).__name__}: {exc}", "engine_error"
                ) from exc
        raise APIError(
            503, f"no engine reachable (tried {', '.join(tried)})", "no_engine",
            headers={"Retry-After": "5"},
        )  # fmt: skip


@functools.cache
def _upstream_timeout(limit: float) -> aiohttp.ClientTimeout:
    """The wait for a pooled connection and each read are bounded by the request timeout (a
    stream may run long, but never stall that long), the TCP connect by 5 s."""
    return aiohttp.ClientTimeout(total=None, connect=limit, sock_connect=5.0, sock_read=limit)


async def _not_resident(upstream: aiohttp.ClientResponse) -> bool:
    """Whether the engine refused the request because its version is not resident there
    (``engine.admission``); such an answer is read whole (it is small, and a later ``read()``
    returns it again)."""
    if upstream.status != 409:
        return False
    content = await upstream.read()
    try:
        code = json.loads(content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return False
    if code == NOT_RESIDENT:
        upstream.release()
        return True
    return False


def _require_json(request: Request) -> None:
    """JSON bodies only, as vLLM itself answers (415 before the body is read)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise APIError(
            415,
            f"Content-Type must be application/json, not {media_type or 'missing'!r}",
            "unsupported_media_type",
        )


def requested_version(request: Request) -> int | None:
    """The version a request asks for in its ``X-Router-Version`` header (None: none)."""
    raw = request.headers.get(VERSION_HEADER)
    if raw is None:
        return None
    text = raw.strip()
    if not text.isdigit() or int(text) > _MAX_VERSION:
        raise APIError(
            400,
            f"{VERSION_HEADER} must be a router version number (0 = the base routers), "
            f"not {raw[:40]!r}",
            "invalid_header",
            VERSION_HEADER,
        )
    return int(text)


def _json_object(body: bytes) -> dict:
    """The body as a JSON object; anything else is refused here (the engine would refuse it
    too, but a 400 from us is clearer than a proxied 4xx)."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", "invalid_json") from exc
    except RecursionError as exc:
        raise APIError(400, "request body is nested too deeply", "invalid_json") from exc
    if not isinstance(payload, dict):
        raise APIError(400, "request body must be a JSON object", "invalid_json")
    return payload


def _wants_stream(payload: dict) -> bool:
    stream = payload.get("stream")
    # The engine's pydantic model would coerce "yes" or 1 to true and stream, while we would
    # not have read it as a stream: refuse anything but a JSON boolean.
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", "invalid_value", "stream")
    return stream is True
