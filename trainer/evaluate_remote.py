"""Score choices through a served model's OpenAI completions API (the gateway or an engine).

This is the second :class:`~roma_trainer.evaluate.LoglikelihoodBackend`: the same requests,
tokenized exactly as :mod:`roma_trainer.scoring` does (context and continuation tokenized
separately with the model's own tokenizer, then concatenated), sent as token ids so that the
server cannot re-tokenize across the boundary. ``echo=true`` + ``logprobs=1`` returns the
log-probability of every prompt token (and its top-1 alternative, for ``is_greedy``); the score
is the sum over the last ``len(continuation_ids)`` of them. Evaluating a patch through the
gateway therefore measures exactly what is served, router swap included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from roma_trainer.evaluate import LoglikelihoodBackend, LoglikelihoodResult
from roma_trainer.scoring import encode_pairs


class RemoteScoringError(RuntimeError):
    """The server refused or answered something the scoring cannot use."""


def completion_payload(model: str, sequences: Sequence[Sequence[int]]) -> dict[str, Any]:
    """One batched /v1/completions request that echoes prompt log-probs and generates 1 token
    (the OpenAI API wants at least one; it is ignored)."""
    return {
        "model": model,
        "prompt": [list(s) for s in sequences],
        "max_tokens": 1,
        "temperature": 0.0,
        "echo": True,
        "logprobs": 1,
    }


def parse_choice(choice: dict[str, Any], prompt_len: int, n_cont: int) -> LoglikelihoodResult:
    """Sum the echoed log-probs of the continuation tokens of one completion choice."""
    logprobs = choice.get("logprobs") or {}
    token_lps = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    if len(token_lps) < prompt_len:
        raise RemoteScoringError(
            f"server echoed {len(token_lps)} prompt log-probs, expected {prompt_len}: "
            "does it support echo=true with logprobs?"
        )
    span = range(prompt_len - n_cont, prompt_len)
    total = sum(float(token_lps[i]) for i in span)
    # top_logprobs maps token text -> logprob; the token was greedy when nothing beat it.
    greedy = all(not tops[i] or float(token_lps[i]) >= max(tops[i].values()) - 1e-6 for i in span)
    return LoglikelihoodResult(total, n_cont, greedy)


class CompletionsBackend(LoglikelihoodBackend):
    """``loglikelihood`` over HTTP. ``tokenizer`` must be the served model's tokenizer."""

    def __init__(
        self,
        base_url: str,
        tokenizer: Any,
        model: str | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        timeout: float = 120.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers)
        self.model = model or self._served_model()
        self.router_versions: set[str] = set()

    def _served_model(self) -> str:
        response = self.client.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LoglikelihoodResult]:
        out: list[LoglikelihoodResult] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            encoded = encode_pairs(self.tokenizer, chunk, self.max_length)
            lengths = [
                c + n for c, n in zip(encoded.context_lens, encoded.continuation_lens, strict=True)
            ]
            sequences = [
                row[:n].tolist() for row, n in zip(encoded.input_ids, lengths, strict=True)
            ]
            response = self.client.post(
                "/v1/completions", json=completion_payload(self.model, sequences)
            )
            if response.status_code != 200:
                raise RemoteScoringError(
                    f"{response.status_code} from the server: {response.text[:500]}"
                )
            if version := response.headers.get("x-router-version"):
                self.router_versions.add(version)
            choices = sorted(response.json()["choices"], key=lambda c: c["index"])
            out.extend(
                parse_choice(choice, n, n_cont)
                for choice, n, n_cont in zip(
                    choices, lengths, encoded.continuation_lens, strict=True
                )
            )
        return out

    def close(self) -> None:
        self.client.close()
