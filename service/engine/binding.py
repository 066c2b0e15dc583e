"""What the gateway adds to a completion request so that the engine runs it under one router
version: the version itself, in vLLM's per-request channel, and a prefix-cache salt per version.

Pure functions, no torch or vLLM import: the gateway calls :func:`bind_request` on every body it
forwards. The engine reads ``vllm_xargs["roma_version"]`` (vLLM copies ``vllm_xargs`` into
``SamplingParams.extra_args``) when the request enters its first step and keeps the request on
that version's slot to its last token. ``cache_salt`` is part of vLLM's prefix-cache block hash,
so KV computed under one version is never reused by a request of another version, and each
version keeps its own warm cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

VERSION_XARG = "roma_version"
# Keys of vllm_xargs the engine reads; a client can never set them (bind_request drops them).
RESERVED_PREFIX = "roma_"


def weights_tag(checksums: Mapping[str, str]) -> str:
    """A short tag of a version's router weights (its per-router sha256s): part of the salt, so
    that a version number reused for other weights (a registry reset under a running engine)
    never meets KV cached under the old ones."""
    joined = ",".join(f"{name}={sha}" for name, sha in sorted(checksums.items()))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def cache_salt(version: int | str, client_salt: str | None = None, tag: str | None = None) -> str:
    """The ``cache_salt`` of a request served under router ``version`` (``tag``: its
    :func:`weights_tag`, when the caller knows it).

    A client's own salt (vLLM's multi-tenant isolation) is kept, hashed: the result stays within
    vLLM's limits (128 characters, none of ``@ / \\ NUL``) whatever the client sent, and two
    requests share KV only if they have the same version *and* the same client salt."""
    salt = f"roma-v{version}" if tag is None else f"roma-v{version}-{tag}"
    if client_salt is not None:
        if not isinstance(client_salt, str) or not client_salt:
            raise ValueError("cache_salt must be a non-empty string")
        salt += "." + hashlib.sha256(client_salt.encode()).hexdigest()
    return salt


def bind_request(
    body: Mapping[str, Any], version: int | str, tag: str | None = None
) -> dict[str, Any]:
    """A copy of an OpenAI request ``body`` bound to router ``version``: ``vllm_xargs`` carries
    the version (any ``roma_*`` key the client sent is dropped: clients cannot pick or spoof a
    version this way) and ``cache_salt`` is :func:`cache_salt` of the version and the client's
    salt. Raises ValueError for a ``vllm_xargs`` or ``cache_salt`` of the wrong type."""
    xargs = body.get("vllm_xargs") or {}
    if not isinstance(xargs, Mapping):
        raise ValueError("vllm_xargs must be a JSON object")
    bound = dict(body)
    bound["vllm_xargs"] = {
        **{k: v for k, v in xargs.items() if not str(k).startswith(RESERVED_PREFIX)},
        VERSION_XARG: str(version),
    }
    bound["cache_salt"] = cache_salt(version, body.get("cache_salt"), tag)
    return bound
