"""Reading a request: the sidecar it is for, its deadline, its parameters and its body.

Numeric parameters go through ``sidecar/values.py`` like the command line's
options, so ``?timeout=nan`` or ``?limit=²`` is a 400 naming the parameter.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request

from sidecar.node.service import Sidecar
from sidecar.values import finite_number, is_decimal, whole_number


def sidecar_of(request: Request) -> Sidecar:
    sidecar: Sidecar = request.app.state.sidecar
    return sidecar


def call_timeout(request: Request) -> float:
    """The call's deadline in seconds, from ``?timeout=``, within the configured maximum."""
    config = sidecar_of(request).config
    raw = request.query_params.get("timeout")
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
    return [(k, v) for k, v in request.query_params.multi_items() if k != "timeout"]


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
    declared = request.headers.get("content-length")
    if declared is not None and is_decimal(declared) and int(declared) > limit:
        raise HTTPException(413, f"request body exceeds the {limit} byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body exceeds the {limit} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)
