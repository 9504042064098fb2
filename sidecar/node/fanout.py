"""Calling one handler on many workers at once.

Used by ``POST /api/v1/handlers/{name}`` and by anything else that needs every
rank's answer (stack dumps of a stalled job). Each worker gets the same
deadline and is awaited concurrently, so a hung worker costs the caller the
timeout once, not once per worker. Ranks that give no answer are reported as
``torch.distributed.debug`` reports them: 408 for a timeout, 503 for a worker
that is not connected.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Protocol

from sidecar.node.relay import CallTimeout, RelayError, UnknownWorker, WorkerUnavailable
from sidecar.schema import Reply


class Caller(Protocol):
    """What fan-out needs of the sidecar: one relayed call."""

    async def call(
        self, key: str, handler: str, params: list[tuple[str, str]], body: bytes, timeout: float
    ) -> Reply: ...


def _failure(status: int, message: str) -> Reply:
    return Reply(status, "text/plain", message.encode(), answered=False)


async def call_one(
    sidecar: Caller,
    key: str,
    handler: str,
    params: list[tuple[str, str]],
    body: bytes,
    timeout: float,
) -> Reply:
    """One worker's answer, with relay failures turned into torch's stand-in statuses."""
    try:
        reply = await sidecar.call(key, handler, params, body, timeout)
    except CallTimeout as exc:
        return _failure(408, f"Timeout: {exc}")
    except (UnknownWorker, WorkerUnavailable) as exc:
        return _failure(503, f"{type(exc).__name__}: {exc}")
    except RelayError as exc:
        return _failure(502, f"{type(exc).__name__}: {exc}")
    return reply


async def fan_out(
    sidecar: Caller,
    keys: Iterable[str],
    handler: str,
    params: list[tuple[str, str]],
    body: bytes,
    timeout: float,
) -> dict[str, Reply]:
    """Call ``handler`` on every worker in ``keys`` concurrently, each within ``timeout``."""
    keys = list(dict.fromkeys(keys))
    results = await asyncio.gather(
        *(call_one(sidecar, key, handler, params, body, timeout) for key in keys)
    )
    return dict(zip(keys, results, strict=True))
