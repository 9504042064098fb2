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
import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from sidecar.node.relay import CallTimeout, RelayError, Reply, UnknownWorker, WorkerUnavailable

# A spec may name at most this many ranks: "0-99999999" is a typo, not a job.
MAX_RANKS = 65536
_ITEM = re.compile(r"^(\d+)(?:-(\d+))?$")
_TEXT_TYPES = ("application/json", "application/xml", "application/javascript")


class Caller(Protocol):
    """What fan-out needs of the sidecar: one relayed call."""

    async def call(
        self, key: str, handler: str, params: list[tuple[str, str]], body: bytes, timeout: float
    ) -> Reply: ...


def parse_ranks(spec: str) -> list[int]:
    """``"0,2-5"`` -> ``[0, 2, 3, 4, 5]``; ValueError with the offending item otherwise."""
    ranks: set[int] = set()
    for item in spec.split(","):
        match = _ITEM.match(item.strip())
        if match is None:
            raise ValueError(f"parameter 'ranks': {item!r} is not a rank or a range like 2-5")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise ValueError(f"parameter 'ranks': range {item!r} ends before it starts")
        if high - low + 1 + len(ranks) > MAX_RANKS:
            raise ValueError(f"parameter 'ranks' names more than {MAX_RANKS} ranks")
        ranks.update(range(low, high + 1))
    return sorted(ranks)


@dataclass(frozen=True)
class RankResult:
    """One worker's part of a fan-out: its reply, or the status standing in for one."""

    status: int
    content_type: str
    body: bytes
    answered: bool

    def to_json(self) -> dict[str, Any]:
        """Status, content type and the body as text, or base64 when it is binary."""
        text = _as_text(self.content_type, self.body)
        return {
            "status": self.status,
            "content_type": self.content_type,
            "encoding": "utf-8" if text is not None else "base64",
            "body": text if text is not None else base64.b64encode(self.body).decode(),
        }


def _as_text(content_type: str, body: bytes) -> str | None:
    mime = content_type.split(";", 1)[0].strip().lower()
    textual = mime.startswith("text/") or mime in _TEXT_TYPES or mime.endswith(("+json", "+xml"))
    if not textual:
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _failure(status: int, message: str) -> RankResult:
    return RankResult(status, "text/plain", message.encode(), answered=False)


async def call_one(
    sidecar: Caller,
    key: str,
    handler: str,
    params: list[tuple[str, str]],
    body: bytes,
    timeout: float,
) -> RankResult:
    """One worker's answer, with relay failures turned into torch's stand-in statuses."""
    try:
        reply = await sidecar.call(key, handler, params, body, timeout)
    except CallTimeout as exc:
        return _failure(408, f"Timeout: {exc}")
    except (UnknownWorker, WorkerUnavailable) as exc:
        return _failure(503, f"{type(exc).__name__}: {exc}")
    except RelayError as exc:
        return _failure(502, f"{type(exc).__name__}: {exc}")
    return RankResult(reply.status, reply.content_type, reply.body, answered=True)


async def fan_out(
    sidecar: Caller,
    keys: Iterable[str],
    handler: str,
    params: list[tuple[str, str]],
    body: bytes,
    timeout: float,
) -> dict[str, RankResult]:
    """Call ``handler`` on every worker in ``keys`` concurrently, each within ``timeout``."""
    keys = list(dict.fromkeys(keys))
    results = await asyncio.gather(
        *(call_one(sidecar, key, handler, params, body, timeout) for key in keys)
    )
    return dict(zip(keys, results, strict=True))


def summary(results: dict[str, RankResult]) -> dict[str, Any]:
    """Counts of who answered, and torch's one-line "PARTIAL DATA" text when not all did."""
    total = len(results)
    ok = sum(1 for r in results.values() if r.status == 200)
    failed = [(key, r) for key, r in results.items() if r.status != 200]
    text = None
    if failed:
        lines = [f"PARTIAL DATA: {ok}/{total} workers responded"]
        lines += [f"  Rank {key}: {r.body.decode(errors='replace')[:200]}" for key, r in failed]
        text = "\n".join(lines)
    return {
        "workers": total,
        "answered": sum(1 for r in results.values() if r.answered),
        "ok": ok,
        "timed_out": sum(1 for r in results.values() if r.status == 408 and not r.answered),
        "unavailable": sum(1 for r in results.values() if r.status == 503 and not r.answered),
        "text": text,
    }
