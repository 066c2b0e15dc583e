"""Reading request bodies with a size limit enforced while the bytes arrive (never after)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from roma_service.gateway.errors import APIError

log = logging.getLogger(__name__)

# Room for multipart boundaries and part headers around the patch itself.
MULTIPART_OVERHEAD = 64 * 1024


def _too_large(limit: int, what: str) -> APIError:
    param = "patch" if "patch" in what else None
    return APIError(413, f"{what} is larger than the limit of {limit} bytes", "too_large", param)


async def read_body(request: Request, limit: int, what: str = "the request body") -> bytes:
    """The whole body, or 413 as soon as it exceeds ``limit`` (Content-Length is checked
    first, so an honest client is refused before it sends anything)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit, what)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(limit, what)
    except ClientDisconnect:
        # A client that gave up (a closed socket, an evaluation harness's timeout) is no
        # server fault: one info line, and an answer nobody will read.
        log.info("client disconnected while sending its request", extra={
            "path": request.url.path, "received_bytes": len(body)})  # fmt: skip
        raise APIError(400, "the client disconnected before sending its whole request",
                       "client_disconnected") from None  # fmt: skip
    return bytes(body)


async def read_patch_upload(request: Request, limit: int) -> bytes:
    """A patch sent as the raw body (any content type but multipart) or as the multipart field
    ``patch`` (``curl -F patch=@file``)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return await read_body(request, limit, "the patch")
    body = await read_body(request, limit + MULTIPART_OVERHEAD, "the patch")

    async def once() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(
        request.headers, once(), max_files=1, max_fields=8, max_part_size=limit
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise APIError(400, f"bad multipart body: {exc.message}", "bad_multipart", "patch") from exc
    try:
        upload = form.get("patch")
        if not isinstance(upload, UploadFile):
            raise APIError(
                400,
                "multipart body has no file field 'patch' (curl -F patch=@patch.safetensors)",
                "missing_patch",
                "patch",
            )
        data = await upload.read()
    finally:
        await form.close()
    if len(data) > limit:
        raise _too_large(limit, "the patch")
    return data
