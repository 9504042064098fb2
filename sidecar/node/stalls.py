"""Noticing stalled workers, and capturing what every worker was doing.

A training job that hangs usually hangs in a collective: one rank stops and
every other rank waits for it, with no error anywhere. So on a stall the
sidecar asks *every* worker of the node for its stacks, not only the stalled
one; the healthy ranks' stacks show what they wait for. A worker that cannot
answer (it holds the GIL in C code, or is stopped) is dumped from outside with
py-spy when it is installed and allowed to attach.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

from sidecar.config import Config
from sidecar.metrics import own
from sidecar.node import events
from sidecar.node.dumps import DumpStore
from sidecar.node.events import EventLog
from sidecar.node.fanout import Caller, fan_out
from sidecar.node.workers import RUNNING, WorkerRegistry, WorkerState
from sidecar.schema import Reply
from worker_hooks.builtin_handlers import find_pyspy

log = logging.getLogger("rankside.sidecar")

PYSPY_TIMEOUT = 30.0


def stall_threshold(worker: WorkerState, config: Config) -> float:
    """Seconds without progress after which ``worker`` counts as stalled."""
    if config.stall_after is not None:
        return config.stall_after
    median = worker.median_step_duration()
    if median is None:
        return config.stall_min
    return max(config.stall_min, config.stall_factor * median)


def stall_reason(worker: WorkerState, config: Config, now: float) -> str | None:
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


class Incidents:
    """Captures dumps of every running worker into the dump store."""

    def __init__(
        self,
        caller: Caller,
        registry: WorkerRegistry,
        store: DumpStore,
        event_log: EventLog,
        config: Config,
    ) -> None:
        self.caller = caller
        self.registry = registry
        self.store = store
        self.events = event_log
        self.config = config
        self.pyspy = find_pyspy() if config.pyspy else None
        self._ids = itertools.count(1)
        # Captures run one at a time, so that two incidents (or an incident and
        # a periodic dump) never race each other's calls into the same workers.
        self._lock = asyncio.Lock()

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    async def capture(self, incident: str, handlers: tuple[str, ...]) -> None:
        """Call ``handlers`` on every running worker and keep what comes back."""
        async with self._lock:
            await self._capture(incident, handlers)

    async def _capture(self, incident: str, handlers: tuple[str, ...]) -> None:
        workers = [w for w in self.registry.all() if w.state == RUNNING]
        keys = [w.key for w in workers]
        for handler in handlers:
            results = await fan_out(self.caller, keys, handler, [], b"", self.config.dump_timeout)
            silent = [w for w in workers if not results[w.key].answered]
            for key, result in results.items():
                await self._save_result(incident, key, handler, result)
            if handler == "dump_traceback" and silent:
                await asyncio.gather(*(self._pyspy_dump(incident, w) for w in silent))

    async def _save_result(self, incident: str, key: str, handler: str, result: Reply) -> None:
        if result.answered and result.status == 200:
            await self._save(incident, key, handler, result.body, result.content_type)
            return
        note = (
            f"worker {key} did not answer {handler} within {self.config.dump_timeout:g} s: "
            f"{result.status} {result.body.decode(errors='replace')}\n"
        )
        await self._save(incident, key, f"{handler}_no_answer", note.encode(), "text/plain")

    async def _pyspy_dump(self, incident: str, worker: WorkerState) -> None:
        if self.pyspy is None:
            return
        # The pid the kernel gave for the worker's socket, never the one its
        # hello claims: a peer must not point py-spy at another process.
        connection = worker.connection
        pid = connection.peer_pid if connection is not None else None
        if pid is None:
            note = f"no py-spy dump of worker {worker.key}: its process is not visible here\n"
            await self._save(incident, worker.key, "pyspy_failed", note.encode(), "text/plain")
            return
        args = [self.pyspy, "dump", "--pid", str(pid)]
        if self.config.pyspy_native:
            args.append("--native")
        try:
            # An argument list, never a shell: nothing here is parsed by sh.
            proc = await asyncio.create_subprocess_exec(
                *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            try:
                out, err = await asyncio.wait_for(proc.communicate(), PYSPY_TIMEOUT)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
                out, err = b"", f"py-spy timed out after {PYSPY_TIMEOUT:g} s".encode()
        except OSError as exc:
            out, err = b"", f"could not run py-spy: {exc}".encode()
        if out and proc.returncode == 0:
            await self._save(incident, worker.key, "pyspy", out, "text/plain")
        else:
            await self._save(incident, worker.key, "pyspy_failed", err or out, "text/plain")

    async def _save(
        self, incident: str, key: str, what: str, content: bytes, content_type: str
    ) -> None:
        try:
            await asyncio.to_thread(self.store.save, incident, key, what, content, content_type)
        except OSError as exc:
            self.events.record(
                events.DUMP_FAILED,
                f"could not write the {what} dump of worker {key}: {exc}",
                key,
                incident=incident,
            )
            return
        own.DUMPS.inc()


class StallDetector:
    """Checks every running worker once per housekeeping round."""

    def __init__(
        self,
        registry: WorkerRegistry,
        event_log: EventLog,
        config: Config,
        incidents: Incidents,
    ) -> None:
        self.registry = registry
        self.events = event_log
        self.config = config
        self.incidents = incidents
        self._captures: set[asyncio.Task[None]] = set()

    def check(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        newly_stalled: list[WorkerState] = []
        for worker in self.registry.all():
            if worker.state != RUNNING:
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
                    events.RESUMED,
                    f"worker {worker.key} resumed after {stalled_for:.1f} s",
                    worker.key,
                    stalled_seconds=stalled_for,
                    step=worker.step,
                )
        if newly_stalled:
            incident = self.incidents.new_id("stall")
            for worker in newly_stalled:
                own.STALLS.inc()
                self.events.record(
                    events.STALLED,
                    f"worker {worker.key} stalled: {worker.stall_reason}",
                    worker.key,
                    reason=worker.stall_reason,
                    step=worker.step,
                    incident=incident,
                )
            self._start_capture(incident)

    def _start_capture(self, incident: str) -> None:
        task = asyncio.create_task(
            self.incidents.capture(incident, ("dump_traceback",)), name=f"capture-{incident}"
        )
        self._captures.add(task)
        task.add_done_callback(self._captures.discard)

    async def close(self) -> None:
        """Stop captures still running (at shutdown)."""
        for task in list(self._captures):
            task.cancel()
        await asyncio.gather(*self._captures, return_exceptions=True)
