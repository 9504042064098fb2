"""Reading a request: the sidecar it is for, its deadline, its parameters and its body.

Numeric parameters go through ``sidecar/values.py`` like the command line's
options, so ``?timeout=nan`` or ``?limit=²`` is a 400 naming the parameter.
Each reading has one definition over plain values (query pairs, an ASGI
``receive``), used by the Starlette routes through their ``Request`` and by
the pure-ASGI relay routes (``sidecar/http/relay.py``) without one.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

from sidecar.config import Config
from sidecar.node.service import Sidecar
from sidecar.values import finite_number, is_decimal, whole_number


def sidecar_of(request: Request) -> Sidecar:
    sidecar: Sidecar = request.app.state.sidecar
    return sidecar


def call_timeout(request: Request) -> float:
    """The call's deadline in seconds, from ``?timeout=``, within the configured maximum."""
    return timeout_of(sidecar_of(request).config, request.query_params.get("timeout"))


def timeout_of(config: Config, raw: str | None) -> float:
    """A ``?timeout=`` value (None: absent) as the call's deadline in seconds; 400 if bad."""
    if raw is None:
        return config.default_call_timeout
    try:
        timeout = finite_number(raw)
    except ValueError:
        timeout = -1.0
    if not 0 < timeout <= config.max_call_timeout:
        raise HTTPException(
            400,
            f"parameter 'timeout' must be a number of seconds in (0, {config.max_call_timeout:g}]",
        )
    return timeout


def handler_params(request: Request) -> list[tuple[str, str]]:
    """Query parameters passed to the handler: all but the sidecar's own ``timeout``."""
    return without_timeout(request.query_params.multi_items())


def without_timeout(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The query ``pairs`` but the sidecar's own ``timeout``: what a handler is passed."""
    return [(k, v) for k, v in pairs if k != "timeout"]


def int_param(request: Request, name: str, default: int, minimum: int = 0) -> int:
    """Integer parameter ``name`` of at least ``minimum``; ``default`` when it is absent.

    ``default`` may lie outside the bounds, to mean "not given".
    """
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        return whole_number(raw, minimum)
    except ValueError:
        raise HTTPException(400, f"parameter {name!r} must be an integer >= {minimum}") from None


async def read_body(request: Request, limit: int | None = None) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes without buffering it all."""
    if limit is None:
        limit = sidecar_of(request).config.max_body
    return await read_limited(request.receive, request.headers.get("content-length"), limit)


async def read_limited(receive: Receive, declared: str | None, limit: int) -> bytes:
    """The body ``receive`` yields, 413 once past ``limit`` bytes, or at once when the
    ``declared`` Content-Length is; ClientDisconnect if the client goes first."""
    if declared is not None and is_decimal(declared) and int(declared) > limit:
        raise HTTPException(413, f"request body exceeds the {limit} byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body exceeds the {limit} byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
