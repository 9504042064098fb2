"""A bound on the request head (request line and headers) an HTTP client may send.

uvicorn's httptools protocol buffers a request's headers, however many and
however long, before the app sees the request: a client could make the
sidecar hold gigabytes before the token check refuses it. This protocol
counts the bytes of each request head as they arrive and answers 431 once
they pass ``MAX_HEAD``, without feeding them to the parser. Bodies are
bounded separately, by ``--max-body`` in the routes that read one.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

MAX_HEAD = 64 * 1024
_END = b"\r\n\r\n"


def http_protocol() -> dict[str, Any]:
    """The uvicorn.Config keywords that bound the request head."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # no httptools: h11 has a bound of its own
        return {"http": "h11", "h11_max_incomplete_event_size": MAX_HEAD}

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._head_bytes = 0
            self._in_head = True
            self._tail = b""
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                # Only the bytes up to the blank line count; the marker may
                # straddle two reads, so the last three bytes are kept.
                window = self._tail + data
                end = window.find(_END)
                self._head_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._tail))
                if self._head_bytes > MAX_HEAD:
                    self._refuse_head()
                    return
                self._tail = window[-3:]
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True
            self._head_bytes = 0
            self._tail = b""

        def _refuse_head(self) -> None:
            body = json.dumps(
                {"error": f"request line and headers exceed the {MAX_HEAD} byte limit"}
            ).encode()
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                b"content-type: application/json\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n"
                b"connection: close\r\n\r\n" + body
            )
            self._in_head = False
            self.transport.close()

    return {"http": BoundedHttpToolsProtocol}
