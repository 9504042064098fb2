"""The shapes of the HTTP API that the node server writes and the client reads.

One module for both ends, below both: a relayed answer (``Reply``), the
summary of a fan-out, the JSON of a worker, the states a worker is in, and the
``ranks`` selection syntax. The server builds these, the client and the
tables read them, and neither has to import the other.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypedDict


class WorkerState(StrEnum):
    """Where a worker is in its life, as the API and the metrics report it."""

    RUNNING = "running"
    EXITED = "exited"
    DISCONNECTED = "disconnected"


_TEXT_TYPES = ("application/json", "application/xml", "application/javascript")


class RankJSON(TypedDict):
    """One rank's answer in a fan-out: the body as text, or base64 when it is binary."""

    status: int
    content_type: str
    encoding: str
    body: str


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: a worker's reply to a call, or any answer a sidecar gave.

    ``answered`` is False when the worker gave no answer and the status stands
    in for one (a timeout, a worker that is not connected).
    """

    status: int
    content_type: str
    body: bytes
    answered: bool = True

    def text(self) -> str | None:
        """The body as text when its content type says it is text and it decodes."""
        mime = self.content_type.split(";", 1)[0].strip().lower()
        textual = (
            mime.startswith("text/") or mime in _TEXT_TYPES or mime.endswith(("+json", "+xml"))
        )
        if not textual:
            return None
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def to_json(self) -> RankJSON:
        text = self.text()
        return {
            "status": self.status,
            "content_type": self.content_type,
            "encoding": "utf-8" if text is not None else "base64",
            "body": text if text is not None else base64.b64encode(self.body).decode(),
        }

    @classmethod
    def from_json(cls, answer: Mapping[str, Any]) -> Reply:
        """The reply a fan-out answer of ``to_json`` describes."""
        body = answer.get("body", "")
        if answer.get("encoding") == "base64":
            raw = base64.b64decode(str(body))
        else:
            raw = str(body).encode()
        status = answer.get("status")
        return cls(status if isinstance(status, int) else 0, str(answer.get("content_type")), raw)

    def json(self) -> Any:
        return json.loads(self.body)

    def error_text(self) -> str:
        """The sidecar's ``{"error": ...}`` message, or the body as text."""
        try:
            message = self.json().get("error")
        except (ValueError, AttributeError):
            message = None
        if isinstance(message, str):
            return message
        return self.body[:500].decode(errors="replace").strip() or f"HTTP {self.status}"


class FanOutSummary(TypedDict):
    """Who answered a fan-out, and torch's one-line "PARTIAL DATA" text when not all did."""

    workers: int
    answered: int
    ok: int
    timed_out: int
    unavailable: int
    text: str | None


def summarize(replies: Mapping[str, Reply]) -> FanOutSummary:
    """The summary of a fan-out's replies, by worker key."""
    failed = [(key, r) for key, r in replies.items() if r.status != 200]
    return {
        "workers": len(replies),
        "answered": sum(1 for r in replies.values() if r.answered),
        "ok": len(replies) - len(failed),
        "timed_out": sum(1 for r in replies.values() if r.status == 408 and not r.answered),
        "unavailable": sum(1 for r in replies.values() if r.status == 503 and not r.answered),
        "text": partial_data_text(len(replies), failed),
    }


def partial_data_text(total: int, failed: Iterable[tuple[str, Reply]]) -> str | None:
    """torch.distributed.debug's report of the ranks that did not answer 200, or None."""
    failed = list(failed)
    if not failed:
        return None
    lines = [f"PARTIAL DATA: {total - len(failed)}/{total} workers responded"]
    lines += [f"  Rank {key}: {r.body.decode(errors='replace')[:200]}" for key, r in failed]
    return "\n".join(lines)


class WorkerJSON(TypedDict):
    """A worker as ``GET /api/v1/workers`` lists it."""

    key: str
    rank: int | None
    local_rank: int | None
    world_size: int | None
    local_world_size: int | None
    group_rank: int | None
    role: str
    pid: int
    hostname: str
    run_id: str
    restart_count: int
    state: WorkerState
    connected_at: float
    last_seen: float
    step: int | None
    steps: int
    progress_time: float | None
    ended_at: float | None
    exit: dict[str, Any] | None
    handlers: list[str]
    # Per process group: desc, ranks, enqueued, started, completed (torch's
    # flight recorder; -1 where the backend does not fill it) and
    # enqueued_changed_at, the sidecar's time of the last change.
    collectives: dict[str, dict[str, Any]]
    stalled: bool
    stalled_since: float | None
    stall_reason: str | None
    median_step_seconds: float | None
    steps_per_second: float | None
    # The last pushed value of the worker's rankside_worker_resident_memory_bytes.
    resident_memory_bytes: float | None


# A spec may name at most this many ranks: "0-99999999" is a typo, not a job.
MAX_RANKS = 65536

# The header of /healthz and /readyz carrying the answering sidecar's process
# id: whoever started a sidecar knows its own from another on the same port.
PID_HEADER = "X-Rankside-Pid"
_RANK_ITEM = re.compile(r"([0-9]+)(?:-([0-9]+))?")


def parse_ranks(spec: str) -> list[int]:
    """``"0,2-5"`` -> ``[0, 2, 3, 4, 5]``; ValueError with the offending item otherwise."""
    ranks: set[int] = set()
    for item in spec.split(","):
        match = _RANK_ITEM.fullmatch(item.strip())
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
