"""Noticing stalled workers: no progress past a threshold, or no heartbeat.

The threshold adapts to each worker's typical step (``--stall-factor`` median
steps, at least ``--stall-min``) unless ``--stall-after`` fixes it. A worker
that stalls is marked, an event recorded, and the stall incident opened or
joined (``sidecar/node/opening.py``); one that makes progress again is unmarked.
"""

from __future__ import annotations

import time

from sidecar.config import Config
from sidecar.metrics import own
from sidecar.node.events import EventKind, EventLog
from sidecar.node.incidents import IncidentKind, Incidents
from sidecar.node.jobwide import JobScope
from sidecar.node.opening import OpenIncident
from sidecar.node.workers import Worker, WorkerTable
from sidecar.schema import WorkerState


def stall_threshold(worker: Worker, config: Config) -> float:
    """Seconds without progress after which ``worker`` counts as stalled."""
    if config.stall_after is not None:
        return config.stall_after
    median = worker.median_step_duration()
    if median is None:
        return config.stall_min
    return max(config.stall_min, config.stall_factor * median)


def stall_reason(worker: Worker, config: Config, now: float) -> str | None:
    """Why ``worker`` is stalled right now, or None when it is not."""
    silent = now - worker.last_seen
    if silent > config.heartbeat_timeout:
        return f"no heartbeat for {silent:.1f} s while its connection stays open"
    # Only a worker that reports steps can stop making progress.
    if worker.steps > 0 and worker.progress_time is not None:
        idle = now - worker.progress_time
        threshold = stall_threshold(worker, config)
        if idle > threshold:
            return f"no progress for {idle:.1f} s (threshold {threshold:.1f} s)"
    return None


# How long a stall incident waits before capturing, for the evidence to settle.
SETTLE_SECONDS = 1.0


class StallDetector:
    """Checks every running worker once per housekeeping round."""

    def __init__(
        self,
        workers: WorkerTable,
        event_log: EventLog,
        config: Config,
        incidents: Incidents,
        job: JobScope | None = None,
    ) -> None:
        self.workers = workers
        self.events = event_log
        self.config = config
        # The stall incident in progress: workers that stall while it is open
        # join it, since in a hang every rank stops within a few seconds.
        self.incident = OpenIncident(IncidentKind.STALL, incidents, event_log, job, SETTLE_SECONDS)

    def check(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        newly_stalled: list[Worker] = []
        for worker in self.workers.all():
            if worker.state is not WorkerState.RUNNING:
                continue
            reason = stall_reason(worker, self.config, now)
            if reason is not None and worker.stalled_since is None:
                worker.stalled_since = now
                worker.stall_reason = reason
                newly_stalled.append(worker)
            elif reason is None and worker.stalled_since is not None:
                stalled_for = now - worker.stalled_since
                worker.stalled_since = None
                worker.stall_reason = None
                self.events.record(
                    EventKind.RESUMED,
                    f"worker {worker.key} resumed after {stalled_for:.1f} s",
                    worker.key,
                    stalled_seconds=stalled_for,
                    step=worker.step,
                )
        if not any(w.stalled_since is not None for w in self.workers.all()):
            self.incident.close(now)
        if newly_stalled:
            incident, _ = self.incident.open(now)
            for worker in newly_stalled:
                own.STALLS.inc()
                self.events.record(
                    EventKind.STALLED,
                    f"worker {worker.key} stalled: {worker.stall_reason}",
                    worker.key,
                    reason=worker.stall_reason,
                    step=worker.step,
                    incident=incident,
                )

    async def close(self) -> None:
        """Stop captures still running (at shutdown)."""
        await self.incident.aclose()
