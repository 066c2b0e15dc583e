"""The swap gate: a readers-writer lock between requests (readers) and a router swap (writer).

Under the ``drain`` policy every proxied request holds a reader slot from before it is sent to
the engine until its last byte is out; a swap takes the writer slot. Writer preference: once a
swap waits, new requests queue behind it (bounded by their own timeout), so in-flight requests
drain and no request is ever generated under two router versions. Under ``immediate`` the gate
is not used; responses that spanned a swap are flagged instead (see completions/serving.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class GateTimeout(TimeoutError):
    """A request could not get in, or a swap could not drain, within its timeout."""


class SwapGate:
    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False

    @property
    def readers(self) -> int:
        return self._readers

    @property
    def swapping(self) -> bool:
        return self._writer

    async def acquire_read(self, timeout_s: float) -> None:
        async with self._cond:
            if self._writer:
                try:
                    await asyncio.wait_for(self._cond.wait_for(lambda: not self._writer), timeout_s)
                except TimeoutError as exc:
                    message = f"a router swap did not finish within {timeout_s:g} s"
                    raise GateTimeout(message) from exc
            self._readers += 1

    async def release_read(self) -> None:
        async with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    @asynccontextmanager
    async def writing(self, timeout_s: float) -> AsyncIterator[None]:
        """Hold new requests, wait (up to ``timeout_s``) for in-flight ones, then swap. On a
        drain timeout nothing is swapped and waiting requests go ahead."""
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer)
            self._writer = True
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: self._readers == 0), timeout_s)
            except BaseException as exc:
                self._writer = False
                self._cond.notify_all()
                if isinstance(exc, TimeoutError):
                    raise GateTimeout(
                        f"{self._readers} in-flight request(s) did not finish within "
                        f"{timeout_s:g} s (ROMA_DRAIN_TIMEOUT_S); nothing was swapped"
                    ) from exc
                raise
        try:
            yield
        finally:
            async with self._cond:
                self._writer = False
                self._cond.notify_all()
