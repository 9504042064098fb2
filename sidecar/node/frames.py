"""A worker's byte stream cut into frames as it arrives: ``FrameStream``.

An ``asyncio.Protocol`` rather than a ``StreamReader``: when the reader task
has no frame waiting, ``data_received`` cuts the frames that arrived and
offers each, in order, to ``on_frame`` there and then. The connection takes
a reply to a waiting call that way, so the only task a reply wakes is its
caller's (through a ``StreamReader`` it woke the connection's reader task
first, which read it with two ``readexactly`` awaits). The first frame not
taken waits for ``read_frame``, which the reader task awaits, and what
follows it stays bytes until the reader gets to it: frames are handled in
the order they came, and counted (``rankside_frames_received_total``) when
they are.

The lengths in a frame's prefix are checked before anything else of it is
kept, so an oversize frame costs nothing; a broken frame is raised by
``read_frame`` in its turn, and what follows it is dropped. With a frame
waiting and more than ``HIGH_WATER`` bytes behind it (a throttled worker, a
slow metrics ingest), reading pauses until the reader task is down to
``LOW_WATER``, and the worker's own sends then wait in its connection
thread, as they did on a stream nobody read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, cast

from sidecar.metrics import own
from worker_hooks import protocol

# StreamReader's flow control, as asyncio.start_unix_server set it up.
HIGH_WATER = 128 * 1024
LOW_WATER = 64 * 1024

# Takes a frame as it arrives; True when it took it, False to leave it to the reader task.
FrameTaker = Callable[[protocol.Header, bytes], bool]
Frame = tuple[protocol.Header, bytes]


class FrameStream(asyncio.Protocol):
    """One worker connection's frames, cut as they arrive; see the module's docstring."""

    def __init__(
        self, max_frame: int, on_connect: Callable[[FrameStream], Coroutine[Any, Any, None]]
    ) -> None:
        self.max_frame = max_frame
        self.on_frame: FrameTaker | None = None
        self._on_connect = on_connect
        self._task: asyncio.Task[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        # The next frame in order, cut and not taken: the reader task's.
        self._next: Frame | None = None
        # A broken frame, raised when the reader task gets to it.
        self._error: protocol.ProtocolError | None = None
        self._ended = False
        self._lost: Exception | None = None
        self._paused = False
        self._discarding = False
        self._waiter: asyncio.Future[None] | None = None

    @property
    def transport(self) -> asyncio.Transport:
        assert self._transport is not None, "not connected yet"
        return self._transport

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        # Held here: the loop keeps only a weak reference to a task.
        self._task = asyncio.get_running_loop().create_task(self._on_connect(self))

    def data_received(self, data: bytes) -> None:
        if self._discarding or self._error is not None:
            return
        # Most reads are one whole frame: cut from the bytes as they came,
        # with only what is left of them kept.
        source: bytes | bytearray = data
        if self._buffer:
            self._buffer += data
            source = self._buffer
        offset = 0
        if self._next is None:
            try:
                while (cut := protocol.cut_frame(source, offset, self.max_frame)) is not None:
                    header, body, offset = cut
                    taker = self.on_frame
                    if taker is None or not taker(header, body):
                        self._next = (header, body)
                        break
                    own.observe_frame(header["type"])
            except protocol.ProtocolError as exc:
                self._error = exc
        if source is self._buffer:
            del self._buffer[:offset]
        else:
            self._buffer += data[offset:]
        if self._next is None and self._error is None:
            return  # nothing for the reader task: it is not woken
        self._wake()
        if self._next is not None and len(self._buffer) > HIGH_WATER and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._ended = True
        self._wake()
        # Keep the transport open for writing: the connection closes it.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = True
        self._lost = exc
        self._wake()

    # -- for the connection's tasks ----------------------------------------

    async def read_frame(self) -> Frame:
        """The next frame in order; ProtocolError for a broken one, and
        IncompleteReadError (or the connection's error) once the worker is gone."""
        while True:
            frame, self._next = self._next, None
            if frame is None:
                if self._error is not None:
                    raise self._error
                frame = self._cut()
            if frame is not None:
                own.observe_frame(frame[0]["type"])
                if self._paused and len(self._buffer) <= LOW_WATER:
                    self._resume()
                return frame
            if self._ended:
                if self._lost is not None:
                    raise self._lost
                raise asyncio.IncompleteReadError(bytes(self._buffer), None)
            # The frame is not whole yet: read on, however big it is.
            self._resume()
            await self._wait()

    async def discard_until_closed(self) -> None:
        """Drop whatever else the peer sends, until it closes its end."""
        self._discarding = True
        self._next = None
        self._buffer.clear()
        self._resume()
        while not self._ended:
            await self._wait()

    def _cut(self) -> Frame | None:
        """The next whole frame out of the buffer; None until it is whole."""
        cut = protocol.cut_frame(self._buffer, 0, self.max_frame)
        if cut is None:
            return None
        header, body, end = cut
        del self._buffer[:end]
        return header, body

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self.transport.resume_reading()

    def _wait(self) -> asyncio.Future[None]:
        self._waiter = asyncio.get_running_loop().create_future()
        return self._waiter

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
