"""Relaying a control call to one worker and waiting for its reply."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """A worker's answer to a call, passed back to the HTTP client unchanged."""

    status: int
    content_type: str
    body: bytes


class RelayError(Exception):
    """A call that got no reply; ``status`` is what the HTTP client sees."""

    status = 502


class UnknownWorker(RelayError):
    status = 404


class WorkerUnavailable(RelayError):
    status = 503


class CallTimeout(RelayError):
    status = 504


class PendingCalls:
    """Calls sent on one connection that await their reply, by call id.

    A reply that comes after its caller gave up finds no entry and is dropped,
    so nothing piles up for late or hostile workers.
    """

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self._waiting: dict[int, asyncio.Future[Reply]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def open(self) -> tuple[int, asyncio.Future[Reply]]:
        call_id = next(self._ids)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        return call_id, future

    def resolve(self, call_id: int, reply: Reply) -> bool:
        future = self._waiting.pop(call_id, None)
        if future is None or future.done():
            return False
        future.set_result(reply)
        return True

    def discard(self, call_id: int) -> None:
        self._waiting.pop(call_id, None)

    def fail_all(self, error: RelayError) -> None:
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(error)

    async def wait(self, call_id: int, future: asyncio.Future[Reply], timeout: float) -> Reply:
        # A timer on the loop rather than asyncio.wait_for, which on Python
        # 3.11 wraps the future in extra futures and callbacks on every call.
        timer = asyncio.get_running_loop().call_later(timeout, _expire, future, timeout)
        try:
            return await future
        finally:
            timer.cancel()
            self.discard(call_id)


def _expire(future: asyncio.Future[Reply], timeout: float) -> None:
    if not future.done():
        future.set_exception(CallTimeout(f"no reply within {timeout:g} s"))
