"""The sidecar's event log: what happened to which worker, and when.

Events live in a bounded in-memory ring, are written to the log as one JSON
line each, and are pushed to live subscribers (the Server-Sent Events route).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

log = logging.getLogger("rankside.events")

DEFAULT_CAPACITY = 10_000
# A live subscriber that falls this far behind is dropped, not waited for.
SUBSCRIBER_BACKLOG = 1_000


class EventKind(StrEnum):
    """What an event is about; the value is its ``kind`` in the API and the SSE ``event:``."""

    CONNECTED = "worker_connected"
    RESTARTED = "worker_restarted"
    DUPLICATE = "worker_duplicate"
    EXITED = "worker_exited"
    DISCONNECTED = "worker_disconnected"
    STALLED = "worker_stalled"
    RESUMED = "worker_resumed"
    HANDLER_FAILED = "handler_failed"
    FRAME_REJECTED = "frame_rejected"
    THROTTLED = "worker_throttled"
    DUMP_FAILED = "dump_failed"
    VERDICT = "incident_verdict"
    STRAGGLER = "worker_straggler"
    SOCKET_RECREATED = "socket_recreated"


@dataclass(frozen=True)
class Event:
    """One thing that happened. ``id`` grows by one per event, from the boot's first id."""

    id: int
    time: float
    kind: EventKind
    worker: str | None
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "kind": self.kind,
            "worker": self.worker,
            "message": self.message,
            "data": self.data,
        }


class Subscription:
    """A live feed of new events, for one SSE client."""

    def __init__(self, log: EventLog) -> None:
        self._log = log
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(SUBSCRIBER_BACKLOG)

    def push(self, event: Event) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            # Too slow: end its stream (None) rather than buffer without bound.
            self._log.unsubscribe(self)
            self.queue.get_nowait()
            self.queue.put_nowait(None)

    def close(self) -> None:
        self._log.unsubscribe(self)


def first_event_id(now: float | None = None) -> int:
    """The id of a sidecar's first event: its boot time in microseconds.

    A restarted sidecar's ids then start above every id of the sidecar before
    it (which would need a million events a second to catch up with the
    clock), so a client resuming with an earlier boot's ``Last-Event-ID`` or
    ``?since=`` gets all of the new sidecar's events instead of missing its
    first ones. Below 2**53, the id stays exact in JavaScript.
    """
    return int((time.time() if now is None else now) * 1_000_000)


class EventLog:
    """A bounded ring of events, newest last."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._events: collections.deque[Event] = collections.deque(maxlen=capacity)
        self._next_id = first_event_id()
        self._subscribers: set[Subscription] = set()

    def record(
        self, kind: EventKind, message: str, worker: str | None = None, **data: Any
    ) -> Event:
        event = Event(self._next_id, time.time(), kind, worker, message, data)
        self._next_id += 1
        self._events.append(event)
        log.info("%s", json.dumps(event.to_json(), default=str))
        for subscriber in list(self._subscribers):
            subscriber.push(event)
        return event

    def newest_first(self, since: int = 0, limit: int | None = None) -> list[Event]:
        """Events with an id above ``since``, newest first, at most ``limit``."""
        found: list[Event] = []
        for event in reversed(self._events):
            if event.id <= since or (limit is not None and len(found) >= limit):
                break
            found.append(event)
        return found

    def subscribe(self) -> Subscription:
        subscription = Subscription(self)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
