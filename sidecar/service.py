"""The sidecar as one object: worker registry, socket server and housekeeping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from . import events
from .config import Config
from .events import EventLog
from .registry import WorkerRegistry, WorkerState
from .relay import CallTimeout, Reply, UnknownWorker, WorkerUnavailable
from .socket_server import WorkerSocketServer

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
        self._housekeeping: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.socket_server.serving

    async def start(self) -> None:
        await self.socket_server.start()
        self._housekeeping = asyncio.create_task(self._housekeep())
        log.info("accepting workers on %s", self.config.socket_path)

    async def stop(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
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
        connection = self.worker(key).connection
        if connection is None:
            raise WorkerUnavailable(f"worker {key} is not connected")
        try:
            reply = await connection.call(handler, params, body, timeout)
        except CallTimeout as exc:
            self._handler_failed(key, handler, 504, str(exc))
            raise
        if reply.status >= 500:
            self._handler_failed(
                key, handler, reply.status, reply.body[:500].decode(errors="replace")
            )
        return reply

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
            for worker in self.registry.prune():
                for hook in self.forget_hooks:
                    hook(worker)
