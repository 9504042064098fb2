"""The node server as one object: ``Sidecar`` builds its parts and relays calls.

It owns the worker table, the event log, the metric store and its
exposition, the worker socket server, the dump store, incident capture,
stall and failure detection (job-wide when given a ``JobScope``), each given
what it needs when built; the HTTP app only reads
them and calls ``Sidecar.call``. Housekeeping, once a second, forgets ended
workers past their grace period (their series with them) and checks for stalls.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from sidecar.config import Config
from sidecar.metrics import own
from sidecar.metrics.exposition import Exposition, reserved_sample_names, worker_labels
from sidecar.metrics.payload import MetricsPayloadError
from sidecar.metrics.store import MetricStore
from sidecar.node.connection import ConnectionContext
from sidecar.node.dumps import DumpStore
from sidecar.node.events import EventKind, EventLog
from sidecar.node.failures import FailureWatch
from sidecar.node.incidents import Incidents, new_incident_id
from sidecar.node.jobwide import JobScope
from sidecar.node.relay import (
    BadReply,
    CallTimeout,
    RelayError,
    UnknownWorker,
    WorkerUnavailable,
    checked,
)
from sidecar.node.socket_server import WorkerSocketServer
from sidecar.node.stalls import StallDetector
from sidecar.node.stragglers import StragglerWatch
from sidecar.node.workers import Worker, WorkerTable
from sidecar.schema import Reply
from worker_hooks.protocol import ProtocolError

log = logging.getLogger("rankside.sidecar")


class Sidecar:
    """Owns the node's worker state; the HTTP app only reads it and relays calls."""

    def __init__(
        self, config: Config, listener: socket.socket, job: JobScope | None = None
    ) -> None:
        self.config = config
        self.workers = WorkerTable(grace=config.grace)
        self.events = EventLog()
        self.metric_store = MetricStore(reserved_sample_names())
        self.exposition = Exposition(self.metric_store, self.workers.all)
        self.socket_server = WorkerSocketServer(
            listener,
            config.socket_path,
            config.socket_mode,
            ConnectionContext(
                workers=self.workers,
                events=self.events,
                on_metrics=self._ingest_metrics,
                max_frame=config.max_frame,
                handshake_timeout=config.handshake_timeout,
                max_frame_rate=config.max_frame_rate,
            ),
            config.allowed_uids,
            config.allowed_gids,
        )
        self.dumps = DumpStore(config.dump_path, config.dump_max_files, config.dump_max_bytes)
        self.incidents = Incidents(self, self.workers, self.dumps, self.events, config)
        # With a job scope, incidents cover every node of the job (sidecar/node/jobwide.py).
        self.job = job
        self.stalls = StallDetector(self.workers, self.events, config, self.incidents, job)
        self.failures = FailureWatch(self.workers, self.events, self.incidents, job)
        self.stragglers = StragglerWatch(
            self.workers, self.events, self.incidents, config.node, job
        )
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def ready(self) -> bool:
        return self.socket_server.serving

    async def start(self) -> None:
        await self.socket_server.start()
        self._tasks.append(asyncio.create_task(self._housekeep()))
        self._tasks.append(asyncio.create_task(self._weigh_stragglers()))
        if self.config.dump_interval is not None:
            self._tasks.append(asyncio.create_task(self._periodic_dumps(self.config.dump_interval)))
        log.info("accepting workers on %s", self.config.socket_path)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.stalls.close()
        await self.failures.close()
        await self.socket_server.close()

    def worker(self, key: str) -> Worker:
        worker = self.workers.get(key)
        if worker is None:
            raise UnknownWorker(f"no worker {key!r} on this node")
        return worker

    async def call(
        self,
        key: str,
        handler: str,
        params: list[tuple[str, str]],
        body: bytes,
        timeout: float,
    ) -> Reply:
        """Relay a handler call to worker ``key`` and return its reply."""
        start = time.perf_counter()
        status = 500
        try:
            link = self.worker(key).link
            if link is None:
                raise WorkerUnavailable(f"worker {key} is not connected")
            try:
                reply = checked(await link.call(handler, params, body, timeout))
            except (CallTimeout, BadReply) as exc:
                self._handler_failed(key, handler, exc.status, str(exc))
                raise
            if reply.status >= 500:
                self._handler_failed(
                    key, handler, reply.status, reply.body[:500].decode(errors="replace")
                )
            status = reply.status
            return reply
        except RelayError as exc:
            status = exc.status
            raise
        finally:
            # Timed here, recorded on the loop's next turn: by then the
            # caller's answer has gone out, and the metrics' locks and bucket
            # search are off the relay's path. A scrape of the same moment may
            # count the call or not, as for any call in flight.
            asyncio.get_running_loop().call_soon(
                own.observe_handler_call, handler, status, time.perf_counter() - start
            )

    def _ingest_metrics(self, worker: Worker, body: bytes) -> None:
        """A worker's ``metrics`` frame body into the store; frames are counted by the reader."""
        try:
            self.metric_store.ingest(worker.key, worker_labels(worker), body)
        except MetricsPayloadError as exc:
            raise ProtocolError(f"bad metrics payload: {exc}", "bad_metrics") from None

    def _handler_failed(self, key: str, handler: str, status: int, detail: str) -> None:
        self.events.record(
            EventKind.HANDLER_FAILED,
            f"handler {handler} on worker {key} failed with {status}: {detail}",
            key,
            handler=handler,
            status=status,
        )

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(self.config.housekeeping_interval)
            try:
                await self._housekeeping_round()
            except Exception:
                # One bad round must not end pruning and stall detection for good.
                log.exception("housekeeping failed; trying again next round")

    async def _housekeeping_round(self) -> None:
        await self.socket_server.check_socket()
        # An ended worker's series stay, with rankside_worker_up 0, until its
        # grace period (--grace) is over; then both go.
        for worker in self.workers.prune():
            self.metric_store.forget(worker.key)
        self.stalls.check()
        self.failures.check()

    async def _weigh_stragglers(self) -> None:
        # Apart from housekeeping: asking the job's other nodes for their
        # arrivals must never hold up stall detection.
        while True:
            await asyncio.sleep(self.config.housekeeping_interval)
            try:
                await self.stragglers.check()
            except Exception:
                log.exception("weighing stragglers failed; trying again next round")

    async def _periodic_dumps(self, interval: float) -> None:
        """Dump the configured handlers of every worker every ``interval`` seconds."""
        while True:
            await asyncio.sleep(interval)
            await self.incidents.capture(new_incident_id("periodic"), self.config.dump_handlers)
