"""Bad inputs against a real gateway: HTTP-level abuse, and what each one gets.

Every case is sent for real (httpx, or a raw socket for requests no HTTP client would send) to
a running gateway, and the answer (status, error code) is recorded. Before and after the whole
list, the active router version and a greedy completion are read: they must not change.

    # start an embedded gateway (tiny OLMoE engine + local Redis) and write docs/bad-inputs.md
    python benchmarks/bad_inputs.py --out docs/bad-inputs.md
    # or against a gateway that is already running
    python benchmarks/bad_inputs.py --url http://127.0.0.1:8000 --token "$ROMA_ADMIN_TOKEN"

The embedded gateway runs with small limits (1 MiB patches, 64 KiB completion bodies) so that
the size cases stay cheap; tests/deploy/test_bad_inputs.py runs the same cases and asserts them.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import httpx
import typer

PATCH_LIMIT = 1024 * 1024
REQUEST_LIMIT = 64 * 1024


@dataclass
class Target:
    """A running gateway and what the cases need to know about it."""

    url: str
    token: str
    model: str = ""
    patch_limit: int = PATCH_LIMIT
    request_limit: int = REQUEST_LIMIT
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, timeout=60.0)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass(frozen=True)
class Answer:
    status: int
    code: str | None
    openai_shape: bool
    detail: str


@dataclass(frozen=True)
class Case:
    area: str
    name: str
    send: Callable[[Target], Answer]
    expect: frozenset[int]


def _answer(response: httpx.Response) -> Answer:
    try:
        body = response.json()
    except ValueError:
        return Answer(response.status_code, None, False, response.text[:120])
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        shape = {"message", "type", "param", "code"} <= set(error)
        return Answer(response.status_code, error.get("code"), shape, str(error.get("message")))
    return Answer(response.status_code, None, False, json.dumps(body)[:120])


def _raw(target: Target, request: bytes) -> Answer:
    """Send bytes no HTTP client would produce; read the answer's status line and body."""
    parts = urlsplit(target.url)
    data = b""
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=30) as sock:
        sock.sendall(request)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while not _complete(data):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    if not data:
        return Answer(0, None, False, "connection closed without an answer")
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    status = int(status_line.split()[1])
    with contextlib.suppress(ValueError, AttributeError):
        error = json.loads(body).get("error")
        if isinstance(error, dict):
            return Answer(status, error.get("code"), True, str(error.get("message")))
    return Answer(status, None, False, status_line)


def _complete(data: bytes) -> bool:
    """A whole response: headers, then Content-Length bytes of body."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def _host(target: Target) -> bytes:
    return urlsplit(target.url).netloc.encode()


# --- the cases -------------------------------------------------------------------------------


def _cases() -> list[Case]:
    cases: list[Case] = []

    def case(area: str, name: str, *expect: int) -> Callable[[Callable], Callable]:
        def register(send: Callable[[Target], httpx.Response | Answer]) -> Callable:
            def run(t: Target) -> Answer:
                try:
                    result = send(t)
                except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
                    return Answer(0, None, False, f"no answer: {type(exc).__name__}: {exc}")
                return result if isinstance(result, Answer) else _answer(result)

            cases.append(Case(area, name, run, frozenset(expect)))
            return send

        return register

    # Authentication on the control routes.
    @case("auth", "POST /routers without Authorization", 401)
    def _(t: Target) -> httpx.Response:
        return t.client.post("/routers", content=b"x")

    @case("auth", "Authorization: Basic (not Bearer)", 401)
    def _(t: Target) -> httpx.Response:
        return t.client.get("/routers", headers={"Authorization": "Basic YWRtaW46YWRtaW4="})

    @case("auth", "Bearer with an empty token", 401)
    def _(t: Target) -> Answer:
        return _raw(
            t,
            b"GET /routers HTTP/1.1\r\nHost: "
            + _host(t)
            + b"\r\nAuthorization: Bearer \r\nConnection: close\r\n\r\n",
        )

    @case("auth", "Bearer with the token's prefix only", 401)
    def _(t: Target) -> httpx.Response:
        return t.client.get("/routers", headers={"Authorization": f"Bearer {t.token[:-1]}"})

    @case("auth", "Bearer token + trailing garbage", 401)
    def _(t: Target) -> httpx.Response:
        return t.client.get("/routers", headers={"Authorization": f"Bearer {t.token}x"})

    @case("auth", "token bytes that are not ASCII (\\xff\\xfe)", 401)
    def _(t: Target) -> httpx.Response:
        return t.client.get("/routers", headers={"Authorization": b"Bearer \xff\xfe\x80"})

    @case("auth", "16 KiB bearer token", 401, 400, 431)
    def _(t: Target) -> httpx.Response:
        return t.client.get("/routers", headers={"Authorization": "Bearer " + "A" * 16384})

    @case("auth", "token in the query string instead of the header", 401)
    def _(t: Target) -> httpx.Response:
        return t.client.get("/routers", params={"token": t.token, "access_token": t.token})

    # POST /routers bodies (HTTP level; content errors are the gateway tests' job).
    @case("upload", "empty raw body", 400)
    def _(t: Target) -> httpx.Response:
        return t.client.post("/routers", content=b"", headers=t.auth)

    @case("upload", "JSON body with Content-Type: application/json", 400, 415)
    def _(t: Target) -> httpx.Response:
        return t.client.post("/routers", json={"patch": "AAAA"}, headers=t.auth)

    @case("upload", "multipart without the 'patch' field (field named 'file')", 400)
    def _(t: Target) -> httpx.Response:
        return t.client.post("/routers", files={"file": ("p.safetensors", b"x")}, headers=t.auth)

    @case("upload", "multipart 'patch' sent as a text field, not a file", 400)
    def _(t: Target) -> httpx.Response:
        return t.client.post(
            "/routers", data={"patch": "not a file"}, headers=t.auth, files={"other": ("o", b"o")}
        )

    @case("upload", "multipart Content-Type without a boundary", 400)
    def _(t: Target) -> httpx.Response:
        return t.client.post(
            "/routers",
            content=b"--x\r\n\r\n--x--\r\n",
            headers={**t.auth, "Content-Type": "multipart/form-data"},
        )

    @case("upload", "multipart body that never closes its boundary", 400)
    def _(t: Target) -> httpx.Response:
        body = b'--b0und\r\nContent-Disposition: form-data; name="patch"; filename="p"\r\n\r\nAAAA'
        return t.client.post(
            "/routers",
            content=body,
            headers={**t.auth, "Content-Type": "multipart/form-data; boundary=b0und"},
        )

    @case("upload", "two 'patch' files in one multipart body", 400)
    def _(t: Target) -> httpx.Response:
        return t.client.post(
            "/routers", headers=t.auth, files=[("patch", ("a", b"a")), ("patch", ("b", b"b"))]
        )

    @case("upload", "raw body over the patch size limit", 413)
    def _(t: Target) -> httpx.Response:
        return t.client.post("/routers", content=b"\0" * (t.patch_limit + 1), headers=t.auth)

    @case("upload", "multipart file over the patch size limit", 413)
    def _(t: Target) -> httpx.Response:
        big = b"\0" * (t.patch_limit + 1)
        return t.client.post("/routers", files={"patch": ("p", big)}, headers=t.auth)

    @case("upload", "Content-Length claims 10 GB (body not sent)", 413)
    def _(t: Target) -> Answer:
        return _raw(
            t,
            b"POST /routers HTTP/1.1\r\nHost: " + _host(t) + b"\r\nAuthorization: "
            b"Bearer " + t.token.encode() + b"\r\nContent-Length: 10000000000\r\n\r\n",
        )

    @case("upload", "chunked body over the limit (no Content-Length)", 413)
    def _(t: Target) -> httpx.Response:
        def chunks() -> Iterator[bytes]:
            for _ in range(t.patch_limit // 65536 + 2):
                yield b"\0" * 65536

        return t.client.post("/routers", content=chunks(), headers=t.auth)

    @case("upload", "gzip bomb (Content-Encoding: gzip, 64 MiB of zeros)", 400, 413, 415)
    def _(t: Target) -> httpx.Response:
        bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)
        return t.client.post(
            "/routers", content=bomb, headers={**t.auth, "Content-Encoding": "gzip"}
        )

    # Version ids in paths.
    for path, expect in [
        ("/routers/-1", (400,)),
        ("/routers/99999999999999999999999999", (400,)),
        ("/routers/1e3", (400,)),
        ("/routers/0x10", (400,)),
        ("/routers/%EF%BC%91", (400, 404)),  # fullwidth digit one
        ("/routers/%00", (400,)),
        ("/routers/..%2F..%2Fetc%2Fpasswd", (400, 404)),
        ("/routers/1%20OR%201=1", (400,)),
        ("/routers/123456789", (404,)),
    ]:

        @case("version ids", f"GET {path}", *expect)
        def _(t: Target, path: str = path) -> httpx.Response:
            return t.client.get(httpx.URL(t.url + path), headers=t.auth)

    @case("version ids", "GET /routers/../../etc/passwd (raw, not normalised)", 400, 404)
    def _(t: Target) -> Answer:
        return _raw(
            t,
            b"GET /routers/../../etc/passwd HTTP/1.1\r\nHost: "
            + _host(t)
            + b"\r\nAuthorization: Bearer "
            + t.token.encode()
            + b"\r\n\r\n",
        )

    @case("version ids", "POST /routers/-5/activate", 400)
    def _(t: Target) -> httpx.Response:
        return t.client.post("/routers/-5/activate", headers=t.auth)

    @case("version ids", "POST /routers/abc/activate", 400)
    def _(t: Target) -> httpx.Response:
        return t.client.post("/routers/abc/activate", headers=t.auth)

    @case("version ids", "POST /routers/4611686018427387905/activate (past 2**62)", 400)
    def _(t: Target) -> httpx.Response:
        return t.client.post("/routers/4611686018427387905/activate", headers=t.auth)

    @case("version ids", "DELETE the active version", 409)
    def _(t: Target) -> httpx.Response:
        active = t.client.get("/routers/active", headers=t.auth).json()["version"]
        return t.client.delete(f"/routers/{active}", headers=t.auth)

    @case("version ids", "DELETE /routers/active (a name, not a version)", 400, 405)
    def _(t: Target) -> httpx.Response:
        return t.client.delete("/routers/active", headers=t.auth)

    @case("version ids", "GET /routers/history?limit=0", 400)
    def _(t: Target) -> httpx.Response:
        return t.client.get("/routers/history", params={"limit": 0}, headers=t.auth)

    @case("version ids", "GET /routers/history?limit=10**30", 400)
    def _(t: Target) -> httpx.Response:
        return t.client.get("/routers/history", params={"limit": 10**30}, headers=t.auth)

    # Wrong methods and unknown paths.
    for method, path in [
        ("PUT", "/routers"),
        ("PATCH", "/v1/completions"),
        ("DELETE", "/v1/models"),
        ("GET", "/v1/completions"),
        ("POST", "/health"),
    ]:

        @case("methods", f"{method} {path}", 405)
        def _(t: Target, method: str = method, path: str = path) -> httpx.Response:
            return t.client.request(method, path, headers=t.auth)

    @case("methods", "TRACE /routers", 405)
    def _(t: Target) -> httpx.Response:
        return t.client.request("TRACE", "/routers", headers=t.auth)

    @case("methods", "GET /collective_rpc (engine dev route, not on the gateway)", 404)
    def _(t: Target) -> httpx.Response:
        return t.client.get("/collective_rpc")

    @case("methods", "POST /collective_rpc with a method name", 404, 405)
    def _(t: Target) -> httpx.Response:
        return t.client.post("/collective_rpc", json={"method": "apply_patch", "args": []})

    # Completions bodies.
    def completion(t: Target, **extra: object) -> dict[str, object]:
        return {"model": t.model, "prompt": "hello", "max_tokens": 4, "temperature": 0, **extra}

    @case("completions", "malformed JSON ('{\"model\":')", 400)
    def _(t: Target) -> httpx.Response:
        return t.client.post(
            "/v1/completions", content=b'{"model":', headers={"Content-Type": "application/json"}
        )

    @case("completions", "top-level JSON array", 400)
    def _(t: Target) -> httpx.Response:
        return t.client.post("/v1/completions", json=[completion(t)])

    @case("completions", "invalid UTF-8 in the body", 400)
    def _(t: Target) -> httpx.Response:
        return t.client.post(
            "/v1/completions",
            content=b'{"model": "\xff\xfe", "prompt": "x"}',
            headers={"Content-Type": "application/json"},
        )

    @case("completions", "JSON nested 30 000 deep (under the size limit)", 400)
    def _(t: Target) -> httpx.Response:
        depth = min(30_000, t.request_limit // 2 - 1)
        return t.client.post(
            "/v1/completions",
            content=b"[" * depth + b"]" * depth,
            headers={"Content-Type": "application/json"},
        )

    @case("completions", "body over the request size limit", 413)
    def _(t: Target) -> httpx.Response:
        return t.client.post(
            "/v1/completions", json=completion(t, prompt="a" * (t.request_limit + 1))
        )

    @case("completions", "form-encoded body", 415)
    def _(t: Target) -> httpx.Response:
        return t.client.post("/v1/completions", data={"model": t.model, "prompt": "x"})

    @case("completions", "max_tokens = -1", 400)
    def _(t: Target) -> httpx.Response:
        return t.client.post("/v1/completions", json=completion(t, max_tokens=-1))

    @case("completions", "max_tokens = 10**12", 400)
    def _(t: Target) -> httpx.Response:
        return t.client.post("/v1/completions", json=completion(t, max_tokens=10**12))

    @case("completions", "temperature = NaN (bare NaN token)", 400)
    def _(t: Target) -> httpx.Response:
        return t.client.post(
            "/v1/completions",
            headers={"Content-Type": "application/json"},
            content=json.dumps(completion(t)).replace('"temperature": 0', '"temperature": NaN'),
        )

    @case("completions", "unknown model name", 404, 400)
    def _(t: Target) -> httpx.Response:
        return t.client.post("/v1/completions", json={**completion(t), "model": "no/such-model"})

    @case("completions", "prompt is an object", 400)
    def _(t: Target) -> httpx.Response:
        return t.client.post("/v1/completions", json=completion(t, prompt={"a": 1}))

    @case("completions", "chat: messages is a string", 400)
    def _(t: Target) -> httpx.Response:
        return t.client.post(
            "/v1/chat/completions", json={"model": t.model, "messages": "hi", "max_tokens": 4}
        )

    @case("completions", "stream = 'yes' (string, not bool)", 400)
    def _(t: Target) -> httpx.Response:
        return t.client.post("/v1/completions", json=completion(t, stream="yes"))

    @case("completions", "unicode prompt (emoji, RTL, NUL): served", 200)
    def _(t: Target) -> httpx.Response:
        return t.client.post("/v1/completions", json=completion(t, prompt="🦜 שלום \u0000 é"))

    # Malformed HTTP (raw socket).
    @case("http", "negative Content-Length", 400)
    def _(t: Target) -> Answer:
        return _raw(
            t,
            b"POST /v1/completions HTTP/1.1\r\nHost: "
            + _host(t)
            + b"\r\nContent-Length: -1\r\n\r\n",
        )

    @case("http", "invalid chunk size in a chunked body", 400)
    def _(t: Target) -> Answer:
        return _raw(
            t,
            b"POST /v1/completions HTTP/1.1\r\nHost: "
            + _host(t)
            + b"\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n0\r\n\r\n",
        )

    @case("http", "both Content-Length and Transfer-Encoding (smuggling)", 400)
    def _(t: Target) -> Answer:
        return _raw(
            t,
            b"POST /v1/completions HTTP/1.1\r\nHost: "
            + _host(t)
            + b"\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )

    @case("http", "garbage request line", 400)
    def _(t: Target) -> Answer:
        return _raw(t, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS hello\r\n\r\n")

    @case("http", "64 KiB URL", 400, 404, 414)
    def _(t: Target) -> Answer:
        return _raw(
            t,
            b"GET /routers/"
            + b"9" * 65536
            + b" HTTP/1.1\r\nHost: "
            + _host(t)
            + b"\r\nAuthorization: Bearer "
            + t.token.encode()
            + b"\r\n\r\n",
        )

    @case("http", "300 headers", 200, 400, 431)
    def _(t: Target) -> httpx.Response:
        return t.client.get("/health", headers={f"X-H{i}": "v" for i in range(300)})

    return cases


CASES = _cases()


# --- running them ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    case: Case
    answer: Answer

    @property
    def ok(self) -> bool:
        return self.answer.status in self.case.expect


def probe(target: Target) -> tuple[int, str]:
    """The active version and a greedy completion: what no bad input may change."""
    active = target.client.get("/routers/active", headers=target.auth)
    active.raise_for_status()
    reply = target.client.post(
        "/v1/completions",
        json={"model": target.model, "prompt": "The router", "max_tokens": 8, "temperature": 0},
    )
    reply.raise_for_status()
    return active.json()["version"], reply.json()["choices"][0]["text"]


def run_cases(target: Target) -> list[Result]:
    if not target.model:
        target.model = target.client.get("/v1/models").json()["data"][0]["id"]
    return [Result(case, case.send(target)) for case in CASES]


def markdown(results: list[Result], before: tuple[int, str], after: tuple[int, str]) -> str:
    lines = [
        "# Bad inputs tried against the gateway",
        "",
        "Produced by `python benchmarks/bad_inputs.py --out docs/bad-inputs.md`, which starts a",
        "real gateway (`roma-serve`: a vLLM-CPU engine on a tiny OLMoE, a local Redis) with",
        f"small limits (patches {PATCH_LIMIT} bytes, completion bodies {REQUEST_LIMIT} bytes),",
        "deploys one real patch (version 1), and sends each input for real",
        "(`--url/--token` run the same list against any gateway started with those limits);",
        "`tests/deploy/test_bad_inputs.py` asserts the same",
        "list. Patch *content* errors (not safetensors, pickle, NaN, wrong shape, fingerprint...)",
        "are covered by the gateway's own tests and not repeated here.",
        "",
        f"{len(results)} inputs; answers outside the expected set: "
        f"{sum(not r.ok for r in results)}; 5xx answers: "
        f"{sum(r.answer.status >= 500 for r in results)}.",
        f"Active version before / after: {before[0]} / {after[0]}; greedy completion "
        f"{'unchanged' if before == after else 'CHANGED'}.",
        "",
        "| # | area | input | status | error code | expected |",
        "|---|------|-------|--------|------------|----------|",
    ]
    for i, r in enumerate(results, 1):
        plain = r.answer.status >= 400 and not r.answer.openai_shape
        code = r.answer.code or ("(plain text)" if plain else "")
        expect = "/".join(str(s) for s in sorted(r.case.expect))
        mark = "" if r.ok else " **unexpected**"
        name = r.case.name.replace("|", "\\|")
        lines.append(
            f"| {i} | {r.case.area} | {name} | {r.answer.status}{mark} | {code} | {expect} |"
        )
    lines += [
        "",
        "(plain text): answered by the HTTP server (uvicorn) before the request reaches the",
        "application, so the body is not the OpenAI error shape.",
        "",
    ]
    unexpected = [r for r in results if not r.ok]
    if unexpected:
        lines += ["## Unexpected answers", ""]
        for r in unexpected:
            lines.append(f"- **{r.case.name}** -> {r.answer.status}: {r.answer.detail[:160]}")
        lines.append("")
    return "\n".join(lines)


# --- an embedded gateway ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def embedded_gateway(model_dir: Path, workdir: Path, timeout_s: float = 600) -> Iterator[Target]:
    """`roma-serve` with its own engine and Redis on free loopback ports; stopped on exit."""
    token = "bad-inputs-" + os.urandom(8).hex()
    port = _free_port()
    env = {
        **os.environ,
        "ROMA_ADMIN_TOKEN": token,
        "ROMA_PORT": str(port),
        "ROMA_ENGINE_PORT": str(_free_port()),
        "ROMA_REDIS_DIR": str(workdir / "redis"),
        "ROMA_MAX_PATCH_BYTES": str(PATCH_LIMIT),
        "ROMA_MAX_REQUEST_BYTES": str(REQUEST_LIMIT),
        "ROMA_LOG_LEVEL": "WARNING",
    }
    for name in ("ROMA_ENGINE_URLS", "ROMA_REDIS_URL"):
        env.pop(name, None)
    log = (workdir / "roma-serve.log").open("wb")
    serve = Path(sys.executable).parent / "roma-serve"
    process = subprocess.Popen(
        [str(serve), "--model", str(model_dir)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        # Its own process group (killpg ends the engine too), in our session: a new session is
        # a new CPU group under Linux autogroups (docs/engine.md, "Slot reads stalled").
        process_group=0,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"roma-serve exited; see {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/ready", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"roma-serve not ready after {timeout_s} s; see {log.name}")
            time.sleep(1)
        yield Target(url, token)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def deploy_one_patch(target: Target, model_dir: Path) -> int:
    """Make version 1 active, so that 'unchanged' means a patched state, not just base."""
    import torch

    from roma_patch import (
        BaseRouters,
        PatchMeta,
        read_checkpoint_routers,
        router_layer,
        write_patch,
    )

    raw = read_checkpoint_routers(model_dir)
    name = sorted(raw)[-1]
    base = raw[name].to_torch()
    tensors = {
        name: base
        + 0.5
        * torch.randn(base.shape, generator=torch.Generator().manual_seed(7), dtype=base.dtype)
    }
    routers = BaseRouters.from_raw(str(model_dir), raw)
    meta = PatchMeta(
        base_model=str(model_dir),
        base_fingerprint=routers.fingerprint(list(tensors)),
        layers=[router_layer(name)],
        objective="bad-inputs",
        hparams={},
    )
    reply = target.client.post("/routers", content=write_patch(tensors, meta), headers=target.auth)
    reply.raise_for_status()
    return reply.json()["version"]


def main(
    url: Annotated[str | None, typer.Option(help="A running gateway; none = start one.")] = None,
    token: Annotated[str | None, typer.Option(envvar="ROMA_ADMIN_TOKEN")] = None,
    model: Annotated[Path | None, typer.Option(help="Checkpoint for the embedded gateway.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the markdown table here.")] = None,
) -> None:
    with contextlib.ExitStack() as stack:
        if url:
            if not token:
                raise typer.BadParameter("--token (or ROMA_ADMIN_TOKEN) is needed with --url")
            target = Target(url, token)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bad-inputs-")))
            if model is None:
                from roma_models import build_tiny_model

                model = build_tiny_model("olmoe", workdir / "olmoe", seed=0)
            target = stack.enter_context(embedded_gateway(model, workdir))
            deploy_one_patch(target, model)
        target.model = target.model or target.client.get("/v1/models").json()["data"][0]["id"]
        before = probe(target)
        results = run_cases(target)
        after = probe(target)
    text = markdown(results, before, after)
    print(text)
    if out:
        out.write_text(text)
    bad = [r for r in results if not r.ok or r.answer.status >= 500]
    if bad or before != after:
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
