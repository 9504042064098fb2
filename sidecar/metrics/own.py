"""The sidecar's own metrics, after the Prometheus exporter guidelines.

They live in a prometheus_client registry of their own, which /metrics renders
after the workers' series. The socket server, the relay and the scrape update
them through the small functions below, which keep label values bounded.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

REGISTRY = CollectorRegistry()

WORKERS_CONNECTED = Gauge(
    "rankside_workers_connected",
    "Workers with a live connection to this sidecar.",
    registry=REGISTRY,
)
WORKERS_KNOWN = Gauge(
    "rankside_workers",
    "Workers this sidecar lists, connected or ended within the grace period.",
    registry=REGISTRY,
)
FRAMES_RECEIVED = Counter(
    "rankside_frames_received",
    "Frames received from workers, by message type.",
    ["type"],
    registry=REGISTRY,
)
FRAMES_REJECTED = Counter(
    "rankside_frames_rejected",
    "Frames or connections refused, by reason; the connection is closed.",
    ["reason"],
    registry=REGISTRY,
)
FRAMES_THROTTLED = Counter(
    "rankside_frames_throttled",
    "Frames read late because their worker sent more than its budget (--max-frame-rate).",
    registry=REGISTRY,
)
HANDLER_CALLS = Counter(
    "rankside_handler_calls",
    "Handler calls relayed to workers, by handler and HTTP status.",
    ["handler", "status"],
    registry=REGISTRY,
)
RELAY_DURATION = Histogram(
    "rankside_relay_duration_seconds",
    "Time from receiving a handler call over HTTP to having the worker's reply.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
SCRAPE_DURATION = Histogram(
    "rankside_scrape_duration_seconds",
    "Time to render /metrics, compression included.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
METRIC_SERIES = Gauge(
    "rankside_metric_series",
    "Series held for workers' own metrics, hidden ones included.",
    registry=REGISTRY,
)
METRIC_CONFLICTS = Counter(
    "rankside_metric_conflicts",
    "Times a worker defined a metric family that clashes in type or label names "
    "with another worker's; the clashing definition is not exposed.",
    registry=REGISTRY,
)
STALLS = Counter(
    "rankside_stalls",
    "Times a worker was found stalled (no progress or no heartbeat past its threshold).",
    registry=REGISTRY,
)
DUMPS = Counter(
    "rankside_dumps",
    "Dump files written to the dump directory, for incidents and periodic dumps.",
    registry=REGISTRY,
)
INCIDENT_CULPRIT = Gauge(
    "rankside_incident_culprit",
    "1 for each rank an open incident names as a culprit.",
    ["rank"],
    registry=REGISTRY,
)
WORKER_EXITS = Counter(
    "rankside_worker_exits",
    "Workers that ended, by reason: exit, exception, or disconnected without a goodbye.",
    ["reason"],
    registry=REGISTRY,
)
for _exit_reason in ("exit", "exception", "disconnected", "other"):
    WORKER_EXITS.labels(reason=_exit_reason)
ProcessCollector(registry=REGISTRY)

# Reasons the foundation's protocol errors carry, so that they show as 0
# before the first one happens.
KNOWN_REJECT_REASONS = (
    "malformed",
    "oversize",
    "unknown_type",
    "unexpected_type",
    "handshake",
    "handshake_timeout",
    "version",
    "peer_credentials",
    "bad_metrics",
)
for _reason in KNOWN_REJECT_REASONS:
    FRAMES_REJECTED.labels(reason=_reason)


class _BoundedLabel:
    """Label values that come from outside (a URL, a worker's frame) are let
    through up to a fixed number of distinct ones, then counted as "other"."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) >= self._limit:
                return "other"
            self._seen.add(value)
            return value


_handler_label = _BoundedLabel(100)


# The labelled children of the per-call counters, looked up once per label
# set: .labels() takes a lock and checks its arguments on every call. Both
# label sets are bounded (known frame types; _handler_label times statuses).
_frame_counters: dict[str, Counter] = {}
_call_counters: dict[tuple[str, int], Counter] = {}


def observe_frame(kind: str) -> None:
    """Count one frame of a known message type."""
    counter = _frame_counters.get(kind)
    if counter is None:
        counter = _frame_counters.setdefault(kind, FRAMES_RECEIVED.labels(type=kind))
    counter.inc()


def observe_rejection(reason: str) -> None:
    """Count one refused frame or connection."""
    FRAMES_REJECTED.labels(reason=reason).inc()


_EXIT_REASONS = frozenset(("exit", "exception", "disconnected"))


def observe_exit(reason: str) -> None:
    """Count one ended worker; reasons are the protocol's, anything else is "other"."""
    WORKER_EXITS.labels(reason=reason if reason in _EXIT_REASONS else "other").inc()


def observe_handler_call(handler: str, status: int, seconds: float) -> None:
    """Count one relayed call with the HTTP status it ended with, and time it."""
    label = _handler_label(handler)
    counter = _call_counters.get((label, status))
    if counter is None:
        child = HANDLER_CALLS.labels(handler=label, status=str(status))
        counter = _call_counters.setdefault((label, status), child)
    counter.inc()
    RELAY_DURATION.observe(seconds)


def set_culprits(ranks: Iterable[int]) -> None:
    """Show exactly ``ranks`` as culprits: every other rank's series is removed."""
    wanted = {str(rank) for rank in ranks}
    INCIDENT_CULPRIT.clear()
    for rank in wanted:
        INCIDENT_CULPRIT.labels(rank).set(1)
