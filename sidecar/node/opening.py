"""The one open incident of a kind: opened once, investigated once, joined by the rest.

In a hang every rank stops within seconds, and in a failure every rank ends
within seconds: one incident each, not one per rank or per node. The first
stall (or failure) opens it; what follows while it is open joins it. After a
moment for the evidence to settle, it is investigated once, job-wide when
the sidecar has a job scope (``sidecar/node/jobwide.py``).

Another node of the job may open its incident of the same hang first: when
its capture request arrives, this node joins that incident (``adopt``)
instead of opening its own (one still settling is given up), and stalls that
follow here join it too. Two nodes that ask each other at the same moment
both answer; the incident whose id sorts first (ids begin with the opening
time) is kept, the other given up before it is published. Either way every
node's capture reaches every verdict.
"""

from __future__ import annotations

import asyncio

from sidecar.node.events import EventKind, EventLog
from sidecar.node.incidents import IncidentKind, Incidents, new_incident_id
from sidecar.node.jobwide import JobScope, investigate_job

# How long a joined incident stays open for this node's ranks to join it,
# while none of them is stalled or failed yet: long enough for the slower
# nodes of a hang to flag their ranks.
JOIN_WINDOW = 60.0


class OpenIncident:
    """The open incident of ``kind`` on this node, if any, and its investigation."""

    def __init__(
        self,
        kind: IncidentKind,
        incidents: Incidents,
        events: EventLog,
        job: JobScope | None,
        settle: float,
    ) -> None:
        self.kind = kind
        self.incidents = incidents
        self.events = events
        self.job = job
        self.settle = settle
        self.current: str | None = None
        self._joined_until = 0.0
        # This node's own incidents; those whose investigation began asking
        # the others; those it decided and published.
        self._own: set[str] = set()
        self._asking: set[str] = set()
        self._decided: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def open(self, now: float) -> tuple[str, bool]:
        """The open incident's id, opening one (and its investigation) if none is."""
        if self.current is not None:
            return self.current, False
        self.current = new_incident_id(self.kind, now)
        self._own.add(self.current)
        task = asyncio.create_task(self._investigate(self.current), name=f"incident-{self.current}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return self.current, True

    def adopt(self, incident_id: str, now: float) -> bool:
        """Join another node's incident ``incident_id``; False if this node keeps its own.

        This node's own incident is given up while it still settles, or when
        it is already asking the others but sorts after ``incident_id`` and
        is not decided yet. Another node's incident, once joined, is kept.
        """
        current = self.current
        if current == incident_id:
            return True
        if current is not None:
            if current not in self._own or current in self._decided:
                return False
            if current in self._asking and current < incident_id:
                return False
        self.current = incident_id
        self._joined_until = now + JOIN_WINDOW
        return True

    def close(self, now: float) -> None:
        """This node's part is over (no rank stalled, or failed, any more)."""
        if self.current is None or now < self._joined_until:
            return
        self.incidents.close_open(self.kind, now)
        self.current = None

    async def _investigate(self, incident_id: str) -> None:
        # Evidence settles for a moment first: the ranks that wait in a
        # collective stall a heartbeat or two after the one they wait for.
        await asyncio.sleep(self.settle)
        if self.current != incident_id:
            return
        self._asking.add(incident_id)
        found = await investigate_job(
            self.incidents, self.job, incident_id, self.kind, lambda: self.current == incident_id
        )
        if found is None:
            return
        self._decided.add(incident_id)
        self.events.record(
            EventKind.VERDICT,
            f"incident {incident_id}: {found.verdict.summary}",
            None,
            incident=incident_id,
            incident_kind=self.kind,
            scope=found.scope,
            culprits=[c.rank for c in found.verdict.culprits],
        )

    async def aclose(self) -> None:
        """Stop investigations still running (at shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
