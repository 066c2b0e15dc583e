"""binding.py: what the gateway adds to every forwarded request (version channel, cache salt)."""

from __future__ import annotations

import pytest

from roma_service.engine.binding import VERSION_XARG, bind_request, cache_salt


def test_bound_request_carries_the_version_and_drops_what_a_client_sent() -> None:
    body = {
        "model": "m",
        "prompt": "hi",
        "vllm_xargs": {"roma_version": "3", "roma_slot": 2, "my_arg": [1, 2]},
    }
    bound = bind_request(body, 7)
    assert bound["vllm_xargs"] == {"my_arg": [1, 2], VERSION_XARG: "7"}
    assert bound["prompt"] == "hi" and bound["cache_salt"] == cache_salt(7)
    assert body["vllm_xargs"]["roma_version"] == "3", "the caller's body is not modified"
    assert bind_request({"prompt": "x"}, 0)["vllm_xargs"] == {VERSION_XARG: "0"}


def test_salts_separate_versions_and_keep_client_salts_apart() -> None:
    from vllm.entrypoints.generate.base.protocol import validate_cache_salt

    salts = {
        cache_salt(1),
        cache_salt(2),
        cache_salt(1, "tenant-a"),
        cache_salt(1, "tenant-b"),
        cache_salt(2, "tenant-a"),
    }
    assert len(salts) == 5
    assert cache_salt(1, "tenant-a") == cache_salt(1, "tenant-a")
    # Whatever the client sent, vLLM accepts the result (<= 128 chars, no @ / \ NUL).
    for salt in [*salts, cache_salt(10**12, "@/\\\x00" * 200)]:
        validate_cache_salt(salt)
    assert bind_request({"cache_salt": "s3cret"}, 4)["cache_salt"] == cache_salt(4, "s3cret")


@pytest.mark.parametrize("body", [{"vllm_xargs": ["roma_version", "1"]}, {"cache_salt": ""}])
def test_malformed_fields_are_refused(body: dict) -> None:
    with pytest.raises(ValueError):
        bind_request(body, 1)
