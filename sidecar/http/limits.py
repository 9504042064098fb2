"""Bounds on what an HTTP client may hold: the request head's size and time, and connections.

uvicorn's httptools protocol buffers a request's head, however long, before
the app sees it, and waits for it however slowly it comes: a client could make
the sidecar hold gigabytes before the token check refuses it, or hold a
connection for ever by sending its headers a byte at a time. This protocol:

- counts the bytes of each request head as they arrive and answers 431 once
  they pass ``MAX_HEAD``, without feeding them to the parser;
- answers 408 and closes when a head takes longer than ``header_timeout``
  seconds from its first byte (or from the connection's opening); idle
  keep-alive connections are uvicorn's to close (``timeout_keep_alive``);
- answers 503 and closes at once when ``max_connections`` are already open.

Bodies are bounded separately, by ``--max-body`` in the routes that read one.

It subclasses uvicorn's ``HttpToolsProtocol`` and overrides the hooks in
``HOOKS``; ``check_uvicorn`` refuses to run on a uvicorn whose class lacks
them, and pyproject.toml pins the uvicorn versions this was tested with.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD = 64 * 1024
_END = b"\r\n\r\n"
# The methods of HttpToolsProtocol overridden or called here, and its attributes read.
HOOKS = (
    "connection_made",
    "data_received",
    "on_headers_complete",
    "on_message_complete",
    "on_response_complete",
)
ATTRIBUTES = ("connections", "transport", "loop")
TESTED_UVICORN = "0.55"


def check_uvicorn() -> None:
    """RuntimeError unless uvicorn's HttpToolsProtocol still has the hooks used here."""
    missing = [name for name in HOOKS if not callable(getattr(HttpToolsProtocol, name, None))]
    assigned = {
        *HttpToolsProtocol.__init__.__code__.co_names,
        *HttpToolsProtocol.connection_made.__code__.co_names,
    }
    missing += [name for name in ATTRIBUTES if name not in assigned]
    if missing:
        import uvicorn

        raise RuntimeError(
            f"uvicorn {uvicorn.__version__} changed HttpToolsProtocol ({', '.join(missing)} "
            f"missing); rankside's request limits were tested with uvicorn {TESTED_UVICORN}"
        )


def _refusal(status: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (
        f"HTTP/1.1 {status}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body


def http_protocol(header_timeout: float, max_connections: int) -> dict[str, Any]:
    """The uvicorn.Config keywords that bound request heads and connections."""
    check_uvicorn()
    too_many = _refusal(
        "503 Service Unavailable",
        f"this sidecar already has {max_connections} connections open (--max-connections)",
    )
    too_slow = _refusal(
        "408 Request Timeout",
        f"the request line and headers took longer than {header_timeout:g} s (--header-timeout)",
    )
    too_long = _refusal(
        "431 Request Header Fields Too Large",
        f"request line and headers exceed the {MAX_HEAD} byte limit",
    )

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._head_bytes = 0
            self._in_head = True
            self._tail = b""
            self._head_timer: asyncio.TimerHandle | None = None
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self._refuse(too_many)
                return
            self._start_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                if self._head_timer is None:
                    self._start_head_timer()  # the first byte of a kept-alive connection's head
                # Only the bytes up to the blank line count; the marker may
                # straddle two reads, so the last three bytes are kept.
                window = self._tail + data
                end = window.find(_END)
                self._head_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._tail))
                if self._head_bytes > MAX_HEAD:
                    self._refuse(too_long)
                    return
                self._tail = window[-3:]
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._stop_head_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True
            self._head_bytes = 0
            self._tail = b""

        def _start_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._in_head and not self.transport.is_closing():
                self._refuse(too_slow)

        def _refuse(self, response: bytes) -> None:
            self._in_head = False
            self._stop_head_timer()
            self.transport.write(response)
            self.transport.close()

    return {"http": BoundedHttpToolsProtocol}
