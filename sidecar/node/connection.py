"""One worker's connection: its handshake, its frames, and the calls relayed to it.

A ``WorkerConnection`` reads frames from one worker process until it goes:
``hello`` enters the worker into the worker table, heartbeats update its
progress, ``metrics`` bodies go to the metrics callback it was given,
``reply`` frames resolve the calls waiting on this connection, and ``bye`` or a
closed socket ends the worker. It is the ``WorkerLink`` the table keeps.
Its ``FrameStream`` (``sidecar/node/frames.py``) cuts the frames as they
arrive and hands replies to it there and then; the reader task reads the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.metrics import own
from sidecar.node.events import EventKind, EventLog
from sidecar.node.frames import FrameStream
from sidecar.node.relay import PendingCalls, RelayError, WorkerUnavailable
from sidecar.node.workers import Worker, WorkerTable
from sidecar.schema import Reply, WorkerState
from worker_hooks import protocol

log = logging.getLogger("rankside.sidecar")

# Metrics payloads above this size are ingested in a thread, so that a big one
# does not hold up relayed calls. Measured (MetricStore.ingest, one core):
# about 90 us per KiB of changed values and 165 us per KiB of a full payload
# (a full one of 10k histogram series: ~127 ms); below 8 KiB, well under a
# millisecond, ingesting inline is cheaper than the hop to a thread.
INLINE_METRICS_BYTES = 8 * 1024
# Worker-supplied text kept in state, events and logs is cut to this length
# (the worker cuts a bye's texts to it too).
MAX_EXIT_TEXT = protocol.MAX_EXIT_TEXT
# Bytes of call frames a worker may leave unread before further calls to it
# fail at once with 503 instead of being queued in the sidecar's memory.
WRITE_BACKLOG_LIMIT = 4 * 1024 * 1024

# How long a refused peer's unread frames are read and dropped after the error
# frame: closing with them unread would reset the connection, and the peer
# would see the reset instead of the error saying why it was refused.
REFUSAL_LINGER = 1.0

# Takes a worker's metrics frame body; raises protocol.ProtocolError when it is bad.
MetricsSink = Callable[[Worker, bytes], None]


def process_running(pid: int | None) -> bool:
    """Whether ``pid`` is a live process in this pid namespace; a zombie is not.

    Read from ``/proc``, without a signal; False when it cannot be seen.
    """
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the command name, which may hold ") ".
    return stat[stat.rfind(")") + 2 :][:1] not in ("", "Z", "X")


async def refuse(stream: FrameStream, message: str) -> None:
    """Send an ``error`` frame, then close so that the peer reads it (see REFUSAL_LINGER)."""
    transport = stream.transport
    if transport.is_closing():
        return
    transport.write(protocol.encode({"type": "error", "message": message}))
    try:
        if transport.can_write_eof():
            transport.write_eof()
        await asyncio.wait_for(stream.discard_until_closed(), REFUSAL_LINGER)
    except (TimeoutError, OSError):
        pass
    finally:
        transport.close()


class FrameBudget:
    """A token bucket of frames: ``rate`` a second, in bursts of as many.

    A worker over it is not cut off, only read more slowly: its own sends
    then block in its connection thread, never in its training thread, and
    the event loop stays free for every other worker and the HTTP side.
    """

    __slots__ = ("_stamp", "_tokens", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = rate
        self._stamp = time.monotonic()

    def take(self) -> float:
        """Take one frame; the seconds to wait before reading the next (0 within budget)."""
        now = time.monotonic()
        self._tokens = min(self.rate, self._tokens + (now - self._stamp) * self.rate) - 1
        self._stamp = now
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


@dataclass(frozen=True)
class ConnectionContext:
    """What every worker connection shares: the table, the event log, limits, the sink."""

    workers: WorkerTable
    events: EventLog
    on_metrics: MetricsSink
    max_frame: int
    handshake_timeout: float
    max_frame_rate: float


class WorkerConnection:
    """One connected worker process: reads its frames and carries calls to it."""

    def __init__(
        self, context: ConnectionContext, stream: FrameStream, peer_pid: int | None = None
    ) -> None:
        self.context = context
        self.stream = stream
        self.transport = stream.transport
        stream.on_frame = self._take_reply
        # From SO_PEERCRED, not from the worker's hello: what py-spy may attach to.
        self._peer_pid = peer_pid
        self.pending = PendingCalls()
        self.worker: Worker | None = None
        self.budget = FrameBudget(context.max_frame_rate)
        self._throttled = False

    @property
    def peer_pid(self) -> int | None:
        return self._peer_pid

    def fail_pending(self, error: RelayError) -> None:
        self.pending.fail_all(error)

    def close(self) -> None:
        self.transport.close()

    async def call(
        self, handler: str, params: list[tuple[str, str]], body: bytes, timeout: float
    ) -> Reply:
        """Send a ``call`` frame and wait up to ``timeout`` seconds for its reply."""
        if self.transport.is_closing():
            raise WorkerUnavailable("worker connection is closing")
        backlog = self.transport.get_write_buffer_size()
        if backlog > WRITE_BACKLOG_LIMIT:
            # A stopped or wedged worker reads nothing: calls to it would pile
            # up in the sidecar's memory, each with its body, until it died.
            raise WorkerUnavailable(
                f"worker is not reading its socket ({backlog} bytes sent to it are unread)"
            )
        call_id, future = self.pending.open()
        header = {
            "type": "call",
            "id": call_id,
            "handler": handler,
            "params": [list(p) for p in params],
            "deadline": time.time() + timeout,
        }
        self.transport.write(protocol.encode(header, body))
        return await self.pending.wait(call_id, future, timeout)

    async def run(self) -> None:
        """Read frames until the worker goes; never raises."""
        timeout = self.context.handshake_timeout
        refusal: protocol.ProtocolError | None = None
        try:
            try:
                header, _ = await asyncio.wait_for(self.stream.read_frame(), timeout)
            except TimeoutError:
                raise protocol.ProtocolError(
                    f"no hello within {timeout:g} s", "handshake_timeout"
                ) from None
            self._welcome(header)
            while True:
                header, body = await self.stream.read_frame()
                if header["type"] == "metrics" and len(body) > INLINE_METRICS_BYTES:
                    await self._ingest_off_loop(body)
                    answered = False
                else:
                    answered = self._dispatch(header, body)
                # Replies to the sidecar's own calls are bounded by its calls: free.
                wait = 0.0 if answered else self.budget.take()
                if wait > 0:
                    await self._throttle(wait)
        except asyncio.IncompleteReadError:
            pass  # the worker closed its end, possibly mid-frame
        except ConnectionError:
            pass
        except protocol.ProtocolError as exc:
            refusal = exc
        except Exception as exc:
            # A frame that passed validation and still broke its handling is a
            # bug, but it must cost this one connection, not the sidecar's log
            # an unexplained traceback and the worker no error frame.
            log.exception("unexpected error handling a frame from %s", self._who())
            refusal = protocol.ProtocolError(f"{type(exc).__name__}: {exc}", "malformed")
        finally:
            if refusal is not None:
                self._reject(refusal)
            self._closed()
        if refusal is not None:
            await refuse(self.stream, str(refusal))
        else:
            self.transport.close()

    def _who(self) -> str:
        return self.worker.key if self.worker else "an unregistered peer"

    async def _ingest_off_loop(self, body: bytes) -> None:
        """Parse a large metrics payload in a thread, keeping the loop free for calls.

        The reader awaits it, so this connection's frames stay in order.
        """
        worker = self.worker
        assert worker is not None
        worker.last_seen = time.time()
        if self.context.workers.is_current(worker):
            await asyncio.to_thread(self.context.on_metrics, worker, body)

    def _take_reply(self, header: protocol.Header, body: bytes) -> bool:
        """Resolve a reply as the stream reads it, before any task is woken; True if so.

        Only once welcomed: a reply before the hello is a broken handshake,
        which the reader task reports. Other frames are the reader task's.
        """
        if header["type"] != "reply" or self.worker is None:
            return False
        try:
            self._dispatch(header, body)
        except Exception:
            return False  # the reader task meets it again, and reports it
        return True

    def _welcome(self, header: protocol.Header) -> None:
        if header["type"] != "hello":
            raise protocol.ProtocolError(
                f"the first frame must be 'hello', not {header['type']!r}", "handshake"
            )
        if header["version"] != protocol.PROTOCOL_VERSION:
            raise protocol.ProtocolError(
                f"protocol version {header['version']} is not supported; "
                f"this sidecar speaks version {protocol.PROTOCOL_VERSION}",
                "version",
            )
        worker = Worker.from_hello(header["identity"], header["handlers"], time.time())
        worker.link = self
        self.worker = worker
        events = self.context.events
        previous = self.context.workers.register(worker)
        held = previous.link if previous is not None else None
        if previous is not None and held is not None:
            # Same key, new process: the old connection no longer speaks for it.
            held.fail_pending(WorkerUnavailable("worker was replaced"))
            previous.link = None
        if (
            previous is not None
            and held is not None
            and held.peer_pid != self.peer_pid
            and process_running(held.peer_pid)
        ):
            # Not a restart: torchrun starts a rank again only once its old
            # process is gone. Two live processes claim one rank (a RANK
            # copied into another program, a second job on this socket).
            message = (
                f"worker {worker.key}: pid {worker.pid} connected while pid {previous.pid}, "
                f"with the same key, is still running; two processes claim this rank. "
                f"pid {worker.pid} now speaks for it and pid {previous.pid}'s frames are ignored"
            )
            log.warning("%s", message)
            events.record(
                EventKind.DUPLICATE,
                message,
                worker.key,
                pid=worker.pid,
                running_pid=previous.pid,
            )
        elif previous is not None and previous.pid != worker.pid:
            events.record(
                EventKind.RESTARTED,
                f"worker {worker.key} restarted as pid {worker.pid}"
                f" (restart count {worker.restart_count})",
                worker.key,
                pid=worker.pid,
                previous_pid=previous.pid,
                restart_count=worker.restart_count,
            )
        else:
            events.record(
                EventKind.CONNECTED,
                f"worker {worker.key} connected (pid {worker.pid})",
                worker.key,
                pid=worker.pid,
                restart_count=worker.restart_count,
                reconnect=previous is not None,
            )
        self.transport.write(
            protocol.encode(
                {
                    "type": "welcome",
                    "version": protocol.PROTOCOL_VERSION,
                    "key": worker.key,
                    # So the worker splits what it sends to fit (--max-frame).
                    "max_frame": self.context.max_frame,
                }
            )
        )

    async def _throttle(self, wait: float) -> None:
        own.FRAMES_THROTTLED.inc()
        if not self._throttled:
            self._throttled = True
            worker = self.worker
            assert worker is not None
            self.context.events.record(
                EventKind.THROTTLED,
                f"worker {worker.key} sends more than {self.context.max_frame_rate:g} frames "
                "a second; reading its connection more slowly (--max-frame-rate)",
                worker.key,
                max_frame_rate=self.context.max_frame_rate,
            )
        await asyncio.sleep(wait)

    def _dispatch(self, header: protocol.Header, body: bytes) -> bool:
        """Apply one frame; True when it was the reply a waiting call expected."""
        worker = self.worker
        assert worker is not None
        worker.last_seen = time.time()
        kind = header["type"]
        workers = self.context.workers
        if kind != "reply" and not workers.is_current(worker):
            # A newer connection took this worker's key (a restarted rank): the
            # old one no longer speaks for it; only its late replies are read.
            return False
        if kind == "heartbeat":
            worker.record_progress(header["step"], header["steps"], header["progress_time"])
            if "collectives" in header:
                groups = protocol.parse_collectives(header["collectives"])
                worker.record_collectives(groups, worker.last_seen)
            if "arrivals" in header:
                worker.record_arrivals(protocol.parse_arrivals(header["arrivals"]))
        elif kind == "reply":
            reply = Reply(header["status"], header["content_type"], body)
            if self.pending.resolve(header["id"], reply):
                return True
            log.debug("dropped a late reply %s from worker %s", header["id"], worker.key)
        elif kind == "metrics":
            self.context.on_metrics(worker, body)
        elif kind == "handlers":
            worker.handlers = [n for n in header["names"] if isinstance(n, str)]
        elif kind == "bye":
            worker.exit = _exit_info(header)
            workers.end(worker, WorkerState.EXITED, worker.last_seen)
            own.observe_exit(worker.exit["reason"])
            self.context.events.record(
                EventKind.EXITED, _exit_message(worker.key, worker.exit), worker.key, **worker.exit
            )
        elif kind == "error":
            log.warning("worker %s reported a protocol error: %s", worker.key, header["message"])
        else:
            raise protocol.ProtocolError(
                f"a worker may not send {kind!r} frames", "unexpected_type"
            )
        return False

    def _reject(self, exc: protocol.ProtocolError) -> None:
        key = self.worker.key if self.worker else None
        self.context.events.record(
            EventKind.FRAME_REJECTED,
            f"closed the connection of {self._who()}: {exc}",
            key,
            reason=exc.reason,
        )
        own.observe_rejection(exc.reason)

    def _closed(self) -> None:
        self.pending.fail_all(WorkerUnavailable("worker disconnected"))
        worker = self.worker
        if worker is not None and worker.link is self:
            self.context.workers.end(worker, WorkerState.DISCONNECTED, time.time())
            if worker.state is WorkerState.DISCONNECTED:
                own.observe_exit("disconnected")
                self.context.events.record(
                    EventKind.DISCONNECTED,
                    f"worker {worker.key} disconnected without saying goodbye",
                    worker.key,
                    pid=worker.pid,
                )


def _exit_message(key: str, info: dict[str, Any]) -> str:
    if info["reason"] == "exception":
        return f"worker {key} failed: {info.get('exc_type')}: {info.get('exc_message')}"
    return f"worker {key} exited ({info['reason']}, code {info.get('exit_code', 0)})"


def _exit_info(header: protocol.Header) -> dict[str, Any]:
    info: dict[str, Any] = {"reason": header["reason"], "at": time.time()}
    for field in ("exc_type", "exc_message"):
        if isinstance(header.get(field), str):
            info[field] = header[field][:MAX_EXIT_TEXT]
    code = header.get("exit_code")
    if isinstance(code, int) and not isinstance(code, bool):
        info["exit_code"] = code
    return info
