"""Noticing stalled workers: no progress past a threshold, or no heartbeat.

The threshold adapts to each worker's typical step (``--stall-factor`` median
steps, at least ``--stall-min``) unless ``--stall-after`` fixes it. A worker
that stalls is marked, an event recorded, and an incident capture started
(``sidecar/node/incidents.py``); one that makes progress again is unmarked.
"""

from __future__ import annotations

import asyncio
import time

from sidecar.config import Config
from sidecar.metrics import own
from sidecar.node.events import EventKind, EventLog
from sidecar.node.incidents import IncidentKind, Incidents
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
    ) -> None:
        self.workers = workers
        self.events = event_log
        self.config = config
        self.incidents = incidents
        self._captures: set[asyncio.Task[None]] = set()
        # The stall incident in progress: workers that stall while it is open
        # join it, since in a hang every rank stops within a few seconds.
        self._incident: str | None = None

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
        if self._incident is not None and not any(
            w.stalled_since is not None for w in self.workers.all()
        ):
            self.incidents.close_open(IncidentKind.STALL, now)
            self._incident = None
        if newly_stalled:
            opened = self._incident is None
            if self._incident is None:
                self._incident = self.incidents.new_id("stall")
            incident = self._incident
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
            if opened:
                self._start_capture(incident)

    def _start_capture(self, incident: str) -> None:
        task = asyncio.create_task(self._investigate(incident), name=f"capture-{incident}")
        self._captures.add(task)
        task.add_done_callback(self._captures.discard)

    async def _investigate(self, incident: str) -> None:
        # Evidence settles for a moment first: the ranks that wait in a
        # collective stall a heartbeat or two after the one they wait for.
        await asyncio.sleep(SETTLE_SECONDS)
        found = await self.incidents.investigate(incident, IncidentKind.STALL)
        self.events.record(
            EventKind.VERDICT,
            f"incident {incident}: {found.verdict.summary}",
            None,
            incident=incident,
            culprits=[c.rank for c in found.verdict.culprits],
        )

    async def close(self) -> None:
        """Stop captures still running (at shutdown)."""
        for task in list(self._captures):
            task.cancel()
        await asyncio.gather(*self._captures, return_exceptions=True)
