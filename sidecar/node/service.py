"""The sidecar as one object: worker registry, socket server and housekeeping."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

from sidecar.config import Config
from sidecar.metrics import own
from sidecar.metrics.exposition import attach_metrics
from sidecar.node import events
from sidecar.node.dumps import DumpStore
from sidecar.node.events import EventLog
from sidecar.node.relay import (
    BadReply,
    CallTimeout,
    RelayError,
    UnknownWorker,
    WorkerUnavailable,
    checked,
)
from sidecar.node.socket_server import WorkerSocketServer
from sidecar.node.stalls import Incidents, StallDetector
from sidecar.node.workers import WorkerRegistry, WorkerState
from sidecar.schema import Reply

log = logging.getLogger("rankside.sidecar")

ForgetHook = Callable[[WorkerState], None]


class Sidecar:
    """Owns the node's worker state; the HTTP app only reads it and relays calls."""

    def __init__(self, config: Config, listener: socket.socket) -> None:
        self.config = config
        self.registry = WorkerRegistry(grace=config.grace)
        self.events = EventLog()
        self.socket_server = WorkerSocketServer(listener, self.registry, config, self.events)
        # Called when an ended worker passes its grace period and is forgotten.
        self.forget_hooks: list[ForgetHook] = []
        self.metrics = attach_metrics(self)
        self.dumps = DumpStore(config.dump_path, config.dump_max_files, config.dump_max_bytes)
        self.incidents = Incidents(self, self.registry, self.dumps, self.events, config)
        self.stalls = StallDetector(self.registry, self.events, config, self.incidents)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def ready(self) -> bool:
        return self.socket_server.serving

    async def start(self) -> None:
        await self.socket_server.start()
        self._tasks.append(asyncio.create_task(self._housekeep()))
        if self.config.dump_interval is not None:
            self._tasks.append(asyncio.create_task(self._periodic_dumps(self.config.dump_interval)))
        log.info("accepting workers on %s", self.config.socket_path)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.stalls.close()
        await self.socket_server.close()

    def worker(self, key: str) -> WorkerState:
        worker = self.registry.get(key)
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
            connection = self.worker(key).connection
            if connection is None:
                raise WorkerUnavailable(f"worker {key} is not connected")
            try:
                reply = checked(await connection.call(handler, params, body, timeout))
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
            own.observe_handler_call(handler, status, time.perf_counter() - start)

    def _handler_failed(self, key: str, handler: str, status: int, detail: str) -> None:
        self.events.record(
            events.HANDLER_FAILED,
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
        for worker in self.registry.prune():
            for hook in self.forget_hooks:
                hook(worker)
        self.stalls.check()

    async def _periodic_dumps(self, interval: float) -> None:
        """Dump the configured handlers of every worker every ``interval`` seconds."""
        while True:
            await asyncio.sleep(interval)
            await self.incidents.capture(
                self.incidents.new_id("periodic"), self.config.dump_handlers
            )
