"""The registry of control handlers a worker answers.

A handler takes a :class:`Request` and returns a :class:`Response`. The
sidecar relays HTTP calls to it; the connection thread hands each call to one of
a few handler threads, which runs it through :func:`dispatch` and sends the reply.
Importing this module registers nothing; the built-in handlers are in
``builtin_handlers``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .protocol import validate_text


@dataclass(frozen=True)
class Request:
    """A relayed call: query parameters as a multimap, and the raw body."""

    params: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def get_param(self, name: str, default: str | None = None) -> str | None:
        """The last value given for ``name``, as torch's ``_Request.get_param``."""
        found = default
        for key, value in self.params:
            if key == name:
                found = value
        return found

    def get_all(self, name: str) -> list[str]:
        return [value for key, value in self.params if key == name]


@dataclass(frozen=True)
class Response:
    """What a handler answers: an HTTP status, a content type and a body."""

    body: bytes | str = b""
    status: int = 200
    content_type: str = "text/plain"

    def body_bytes(self) -> bytes:
        return self.body.encode() if isinstance(self.body, str) else self.body


class HandlerError(Exception):
    """Raised by a handler to answer with ``status`` and ``message`` (a 400 for a bad parameter)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


Handler = Callable[[Request], Response]

_lock = threading.Lock()
_handlers: dict[str, Handler] = {}
# Bumped on every registration so the connection thread can tell the sidecar.
_generation = 0
# The quick handlers, by id: kept by identity, since a program's handler
# object need not be hashable, and held so that no id is ever reused.
_quick: dict[int, Handler] = {}


def quick(fn: Handler) -> Handler:
    """Mark ``fn`` quick: it answers within about a millisecond and never waits.

    The connection thread runs a quick handler itself as it reads the call,
    with no hand-off to a handler thread and back, and so answers it even
    while every handler thread is busy. A quick handler takes no lock another
    thread may hold for long and does no I/O that can block. The mark is the
    function's, not the name's: a program's own handler registered under the
    same name runs on a handler thread, as every handler of a program does.
    """
    _quick[id(fn)] = fn
    return fn


def quick_handler(name: str) -> Handler | None:
    """The handler registered as ``name`` if it is quick, else None."""
    with _lock:
        fn = _handlers.get(name)
    return fn if fn is not None and _quick.get(id(fn)) is fn else None


def register_handler(name: str, fn: Handler) -> None:
    """Register ``fn`` as the handler called ``name``, replacing any before it."""
    _register(name, fn, replace=True)


def register_default_handler(name: str, fn: Handler) -> None:
    """Register ``fn`` as ``name`` unless a handler of that name is registered already.

    The built-in handlers register this way, so a program's own handler of the
    same name wins whether it was registered before the built-ins or after.
    """
    _register(name, fn, replace=False)


def _register(name: str, fn: Handler, replace: bool) -> None:
    global _generation
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"invalid handler name {name!r}")
    # A name is one segment of a URL path: a line feed in one registered, and
    # the sidecar's routes could never reach it (404).
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name):
        raise ValueError(f"invalid handler name {name!r}: it holds a control character")
    # Refused here, in the caller's thread: in the hello it stopped the connection.
    validate_text(name, "handler name")
    with _lock:
        if replace or name not in _handlers:
            _handlers[name] = fn
            _generation += 1


def handler_names() -> list[str]:
    with _lock:
        return sorted(_handlers)


def generation() -> int:
    return _generation


def dispatch(name: str, request: Request, fn: Handler | None = None) -> Response:
    """Run handler ``name`` (``fn`` when already looked up); unknown and failing
    handlers answer as torch's server does.

    What comes back is always a reply the sidecar accepts: an ``int`` status,
    a ``str`` content type and a ``bytes`` body. A handler that returns
    anything else answers 500 with what was wrong, as if it had raised.
    """
    if fn is None:
        with _lock:
            fn = _handlers.get(name)
    if fn is None:
        return Response(f"Handler {name} not found: Failed to find handler {name}", 404)
    try:
        response = fn(request)
    except HandlerError as exc:
        response = Response(str(exc), exc.status)
    except Exception as exc:
        return failure(name, exc)
    try:
        return _checked(response)
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        return failure(name, exc)


def failure(name: str, exc: BaseException) -> Response:
    """The 500 of a handler that failed with ``exc``, worded as torch's server does."""
    text = f"Handler {name} failed: {type(exc).__name__}: {exc}"
    # The message may hold lone surrogates, which UTF-8 cannot carry.
    return Response(text.encode("utf-8", "backslashreplace"), 500)


def _checked(response: object) -> Response:
    """``response`` with a bytes body; TypeError or ValueError if it cannot be sent."""
    if not isinstance(response, Response):
        raise TypeError(f"returned {type(response).__name__}, not a Response")
    status = response.status
    # bool is an int subclass, but True is no HTTP status.
    if not isinstance(status, int) or isinstance(status, bool):
        raise TypeError(f"status must be an int, not {type(status).__name__}")
    if not 100 <= status <= 599:
        raise ValueError(f"status {status} is not an HTTP status (100-599)")
    content_type = response.content_type
    if not isinstance(content_type, str):
        raise TypeError(f"content_type must be a str, not {type(content_type).__name__}")
    content_type.encode()
    body = response.body
    if isinstance(body, str):
        body = body.encode()
    elif isinstance(body, (bytes, bytearray, memoryview)):
        body = bytes(body)
    else:
        raise TypeError(f"body must be bytes or str, not {type(body).__name__}")
    return Response(body, int(status), content_type)
