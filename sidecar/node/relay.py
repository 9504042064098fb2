"""Relaying a control call to one worker and waiting for its reply."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re

from sidecar.schema import Reply


class RelayError(Exception):
    """A call that got no reply; ``status`` is what the HTTP client sees."""

    status = 502


class UnknownWorker(RelayError):
    status = 404


class WorkerUnavailable(RelayError):
    status = 503


class CallTimeout(RelayError):
    status = 504


class BadReply(RelayError):
    """The worker answered with something no HTTP response can carry."""

    status = 502


# What a header value may hold once Starlette encodes it: printable ASCII.
# Anything else (CR, LF, NUL, non-Latin-1) breaks or splits the response.
_CONTENT_TYPE = re.compile(r"[\x20-\x7e\t]{0,256}")
# Statuses whose responses have no body (RFC 9110): one sent anyway would be
# read as the start of the next response on a kept-alive connection.
_NO_BODY = (204, 205, 304)


def checked(reply: Reply) -> Reply:
    """``reply`` as an HTTP client may receive it; BadReply when it cannot be one.

    A worker's handler chooses its status and content type freely, and a
    status of 1xx or outside 200-599, or a content type with a line break,
    would otherwise reach the HTTP server and cut the caller off mid-response.
    """
    if not 200 <= reply.status <= 599:
        raise BadReply(f"the worker replied with status {reply.status}, not a final HTTP status")
    if not _CONTENT_TYPE.fullmatch(reply.content_type):
        raise BadReply(
            f"the worker replied with content type {reply.content_type[:100]!r}, "
            "which is not a valid header value"
        )
    if reply.status in _NO_BODY and reply.body:
        return dataclasses.replace(reply, body=b"")
    return reply


class PendingCalls:
    """Calls sent on one connection that await their reply, by call id.

    A reply that comes after its caller gave up finds no entry and is dropped,
    so nothing piles up for late or hostile workers.
    """

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self._waiting: dict[int, asyncio.Future[Reply]] = {}
        # The connection's loop, looked up once: on Python 3.11 every
        # asyncio.get_running_loop() is a getpid() syscall (its fork check).
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def open(self) -> tuple[int, asyncio.Future[Reply]]:
        call_id = next(self._ids)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = self._loop.create_future()
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
        timer = future.get_loop().call_later(timeout, _expire, future, timeout)
        try:
            return await future
        finally:
            timer.cancel()
            self.discard(call_id)


def _expire(future: asyncio.Future[Reply], timeout: float) -> None:
    if not future.done():
        future.set_exception(CallTimeout(f"no reply within {timeout:g} s"))
