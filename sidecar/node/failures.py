"""Noticing failures: ranks that end with an error open a ``failure`` incident.

When one rank of a gloo job ends, every peer fails a moment later with
``Connection closed by peer``, and each node's torchrun reports the failures
of its own node. The incident waits a moment for those ends to come in, then
names the rank that ended first across the job and lists the rest as its
followers (``sidecar/node/diagnosis.py``, ``decide_failure``). A rank that
ended cleanly but too early counts, since it is what the others failed on;
a job whose ranks all end cleanly opens nothing.
"""

from __future__ import annotations

import time

from sidecar.node.diagnosis import is_failure
from sidecar.node.events import EventLog
from sidecar.node.incidents import IncidentKind, Incidents
from sidecar.node.jobwide import JobScope
from sidecar.node.opening import OpenIncident
from sidecar.node.workers import WorkerTable

# How long after the first failure the capture waits, for the ends that
# follow it (on this node and others) to be recorded.
SETTLE_SECONDS = 2.0


class FailureWatch:
    """Checks, once per housekeeping round, for workers that failed since the last."""

    def __init__(
        self,
        workers: WorkerTable,
        event_log: EventLog,
        incidents: Incidents,
        job: JobScope | None = None,
    ) -> None:
        self.workers = workers
        self.incident = OpenIncident(
            IncidentKind.FAILURE, incidents, event_log, job, SETTLE_SECONDS
        )
        self._seen: set[tuple[str, float]] = set()

    def check(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        failures = [
            w for w in self.workers.all() if w.ended_at is not None and is_failure(w.state, w.exit)
        ]
        fresh = [w for w in failures if (w.key, w.ended_at or 0.0) not in self._seen]
        self._seen = {(w.key, w.ended_at or 0.0) for w in failures}
        if fresh:
            self.incident.open(now)
        elif not failures:
            # The failed ranks are gone (restarted, or past their grace period).
            self.incident.close(now)

    async def close(self) -> None:
        await self.incident.aclose()
