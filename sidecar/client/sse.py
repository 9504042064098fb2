"""A reader of ``text/event-stream``, as the HTML standard parses one (section 9.2.6).

No I/O: ``EventStream.feed`` takes the bytes of a connection as they arrive
and returns the events they complete, so one reader serves any client.
``EventStream`` also keeps what outlives a connection, as a browser's
EventSource does: the id of the last event (sent back as ``Last-Event-ID``
when reconnecting) and the reconnection time a ``retry:`` field set.

httpx-sse was the other choice; this reader follows the standard where that
library (0.4) does not: it dispatches no event for a blank line that ends no
data (each keep-alive comment after the first id would be one), takes
``retry:`` only as ASCII digits, and skips a leading byte order mark.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from sidecar.values import is_decimal

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"
# A line longer than this is not an event of a sidecar's; it would only grow the buffer.
MAX_LINE = 1 << 20


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched event: its type (``message`` unless named), data and last event id."""

    type: str
    data: str
    last_event_id: str


class EventStream:
    """The state of one event stream, across the connections that read it.

    ``last_event_id`` and ``retry`` (milliseconds, None until the server sends
    one) persist; a partial line or event does not outlive its connection.
    """

    def __init__(self, last_event_id: str = "") -> None:
        self.last_event_id = last_event_id
        self.retry: int | None = None
        self.begin()

    def reconnect_delay(self, default: float) -> float:
        """Seconds to wait before reconnecting: the server's ``retry:``, else ``default``."""
        return self.retry / 1000 if self.retry is not None else default

    def begin(self) -> None:
        """A new connection: nothing of the previous one's unfinished event is kept."""
        self._pending = b""
        self._at_start = True
        self._after_cr = False
        self._data: list[str] = []
        self._type = ""
        # The last event id buffer starts from the id the connection resumes from.
        self._id = self.last_event_id

    def end(self) -> None:
        """The connection is over: an event it did not finish with a blank line is dropped."""
        self.begin()

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """The events that ``chunk``, the next bytes of the connection, completes."""
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split between two chunks
        if chunk:
            self._after_cr = chunk.endswith(b"\r")
        data = self._pending + chunk
        if self._at_start:
            if len(data) < len(_BOM) and _BOM.startswith(data):
                self._pending = data  # a byte order mark, perhaps: wait for the rest
                return []
            if data.startswith(_BOM):
                data = data[len(_BOM) :]  # one, at the start of the stream
            self._at_start = False
        events: list[ServerSentEvent] = []
        start = 0
        for match in _LINE_END.finditer(data):
            event = self._line(data[start : match.start()].decode("utf-8", errors="replace"))
            start = match.end()
            if event is not None:
                events.append(event)
        self._pending = data[start:]
        if len(self._pending) > MAX_LINE:
            raise ValueError(f"an event stream line is longer than {MAX_LINE} bytes")
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: the sidecar's keep-alive
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]  # one space, and only one
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry" and is_decimal(value):
            self.retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        self.last_event_id = self._id
        data, self._data = self._data, []
        kind, self._type = self._type, ""
        if not data:
            return None
        return ServerSentEvent(kind or "message", "\n".join(data), self.last_event_id)


def events_of(stream: EventStream, chunks: Iterator[bytes]) -> Iterator[ServerSentEvent]:
    """Every event of one connection's ``chunks``, in order."""
    stream.begin()
    try:
        for chunk in chunks:
            yield from stream.feed(chunk)
    finally:
        stream.end()
