"""The worker's link to the node sidecar, run by one background daemon thread.

The thread connects to the sidecar's unix socket, says ``hello``, then sends a
heartbeat every interval and answers the ``call`` frames that come back.
Handlers run on a few daemon threads of their own so that a slow one delays no
heartbeat. When the sidecar is missing or goes away the thread retries with
capped exponential backoff. The training thread never touches the socket except
for the short ``bye`` at exit, and even then with a bounded wait.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from . import handlers, metrics, protocol, torch_bridge
from .identity import Identity
from .progress import PROGRESS

log = logging.getLogger("rankside.worker")

FIRST_RETRY = 0.05
MAX_RETRY = 2.0
HANDLER_THREADS = 4
# How often the connection thread looks for new handlers (torch's included).
HANDLER_POLL_INTERVAL = 0.25
# How long the training thread may wait at exit to say goodbye.
BYE_TIMEOUT = 1.0


def _env_float(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        log.warning("rankside: ignoring %s=%r, not a number", name, os.environ.get(name))
        return default
    return value if value > 0 else default


class FrameBuffer:
    """Accumulates bytes from a stream and cuts them into frames."""

    def __init__(self, max_frame: int = protocol.DEFAULT_MAX_FRAME) -> None:
        self._data = bytearray()
        self._max_frame = max_frame

    def feed(self, chunk: bytes) -> list[tuple[protocol.Header, bytes]]:
        self._data += chunk
        frames: list[tuple[protocol.Header, bytes]] = []
        while len(self._data) >= protocol.PREFIX_SIZE:
            header_len, body_len = protocol.parse_prefix(
                bytes(self._data[: protocol.PREFIX_SIZE]), self._max_frame
            )
            end = protocol.PREFIX_SIZE + header_len + body_len
            if len(self._data) < end:
                break
            header = protocol.parse_header(
                bytes(self._data[protocol.PREFIX_SIZE : protocol.PREFIX_SIZE + header_len])
            )
            body = bytes(self._data[protocol.PREFIX_SIZE + header_len : end])
            del self._data[:end]
            frames.append((header, body))
        return frames


class HandlerPool:
    """A few daemon threads that run handler calls.

    Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so a
    hung handler would keep a finished training process alive.
    """

    def __init__(self, threads: int = HANDLER_THREADS) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._threads = threads
        self._started = False
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if not self._started:
                for i in range(self._threads):
                    threading.Thread(
                        target=self._run, name=f"rankside-handler-{i}", daemon=True
                    ).start()
                self._started = True
        self._queue.put(job)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                job()
            except Exception:
                log.exception("rankside: handler job failed")


class Connection:
    """Keeps this worker registered with the sidecar at ``path``."""

    def __init__(self, path: str, identity: Identity) -> None:
        self.path = path
        self.identity = identity
        self.heartbeat_interval = _env_float("RANKSIDE_HEARTBEAT_INTERVAL", 1.0)
        self.flush_interval = _env_float("RANKSIDE_FLUSH_INTERVAL", 1.0)
        self.key: str | None = None
        self._stop = threading.Event()
        self._send_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pool = HandlerPool()
        self._thread = threading.Thread(target=self._run, name="rankside-connection", daemon=True)
        self._connected = threading.Event()
        self._torch_sync_failed = False

    # -- lifecycle, called from the training thread --------------------------

    def start(self) -> None:
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """Wait until registered with the sidecar (tests and demos use this)."""
        return self._connected.wait(timeout)

    def close(self, bye: dict[str, Any] | None = None) -> None:
        """Say how the worker ended, if connected, and stop the thread."""
        self._stop.set()
        sock = self._sock
        if sock is not None and bye is not None and self._connected.is_set():
            # The last steps may have come after the last heartbeat.
            self._send(self._heartbeat(), timeout=BYE_TIMEOUT)
            self._flush_metrics(full=False, deadline=BYE_TIMEOUT)
            self._send({"type": "bye", **bye}, timeout=BYE_TIMEOUT)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(BYE_TIMEOUT)

    def after_fork_in_child(self) -> None:
        """A forked child (a DataLoader worker) must not speak on the parent's socket."""
        sock, self._sock = self._sock, None
        self._stop.set()
        if sock is not None:
            sock.close()

    # -- the connection thread ----------------------------------------------

    def _run(self) -> None:
        delay = FIRST_RETRY
        logged_missing = False
        while not self._stop.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
            except OSError as exc:
                sock.close()
                if not logged_missing:
                    log.info("rankside: sidecar not reachable at %s (%s); retrying", self.path, exc)
                    logged_missing = True
                self._stop.wait(delay)
                delay = min(delay * 2, MAX_RETRY)
                continue
            logged_missing = False
            self._sock = sock
            try:
                self._session(sock)
            except (OSError, protocol.ProtocolError) as exc:
                if not self._stop.is_set():
                    log.info("rankside: lost the sidecar connection (%s); reconnecting", exc)
            finally:
                # Only a session that was welcomed resets the backoff: a sidecar
                # that refuses us (say, another protocol version) is not hammered.
                if self._connected.is_set():
                    delay = FIRST_RETRY
                self._connected.clear()
                self._sock = None
                sock.close()
            self._stop.wait(delay)
            delay = min(delay * 2, MAX_RETRY)

    def _session(self, sock: socket.socket) -> None:
        frames = FrameBuffer()
        sent_generation = handlers.generation()
        self._send_now(
            sock,
            {
                "type": "hello",
                "version": protocol.PROTOCOL_VERSION,
                "identity": self.identity.to_json(),
                "handlers": handlers.handler_names(),
            },
        )
        self._send_now(sock, self._heartbeat())
        self._flush_metrics(full=True)
        next_heartbeat = time.monotonic() + self.heartbeat_interval
        next_flush = time.monotonic() + self.flush_interval
        next_poll = time.monotonic()
        while not self._stop.is_set():
            timeout = max(0.0, min(next_heartbeat, next_flush, next_poll) - time.monotonic())
            readable, _, _ = select.select([sock], [], [], timeout)
            if readable:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise ConnectionResetError("sidecar closed the connection")
                for header, body in frames.feed(chunk):
                    self._on_frame(header, body)
            now = time.monotonic()
            if now >= next_poll:
                # Torch's handlers appear when the script imports torch, and
                # handlers registered later must reach the sidecar within a second.
                self._sync_torch_handlers()
                next_poll = now + HANDLER_POLL_INTERVAL
            if handlers.generation() != sent_generation:
                sent_generation = handlers.generation()
                self._send_now(sock, {"type": "handlers", "names": handlers.handler_names()})
            if now >= next_heartbeat:
                self._send_now(sock, self._heartbeat())
                next_heartbeat = now + self.heartbeat_interval
            if now >= next_flush:
                self._flush_metrics(full=False)
                next_flush = now + self.flush_interval

    def _sync_torch_handlers(self) -> None:
        try:
            torch_bridge.sync()
        except Exception:
            if not self._torch_sync_failed:
                log.exception("rankside: could not list torch's control handlers")
            self._torch_sync_failed = True

    def _on_frame(self, header: protocol.Header, body: bytes) -> None:
        kind = header["type"]
        if kind == "welcome":
            self.key = header["key"]
            self._connected.set()
        elif kind == "call":
            call_id: int = header["id"]
            name: str = header["handler"]
            deadline: float = header["deadline"]
            request = handlers.Request(protocol.params_to_pairs(header["params"]), body)
            self._pool.submit(lambda: self._answer(call_id, name, request, deadline))
        elif kind == "error":
            raise protocol.ProtocolError(f"sidecar refused us: {header['message']}")
        else:
            log.debug("rankside: ignoring %r frame from the sidecar", kind)

    def _answer(self, call_id: int, name: str, request: handlers.Request, deadline: float) -> None:
        if time.time() > deadline:
            # Queued behind slow or hung handlers until the sidecar gave up on
            # it: nobody waits for the answer, so the handler is not run.
            log.debug("rankside: skipped call %s to %s, its deadline has passed", call_id, name)
            return
        response = handlers.dispatch(name, request)
        self._send(
            {
                "type": "reply",
                "id": call_id,
                "status": response.status,
                "content_type": response.content_type,
            },
            response.body_bytes(),
        )

    def _heartbeat(self) -> protocol.Header:
        return {
            "type": "heartbeat",
            "step": PROGRESS.step,
            "steps": PROGRESS.steps,
            "progress_time": PROGRESS.progress_time,
        }

    def _flush_metrics(self, full: bool, deadline: float | None = None) -> None:
        """Push the metric series that changed, or all of them when ``full``.

        Values are cumulative, so a push lost with a broken connection costs
        nothing: the next session starts with a full one.
        """
        body = metrics.REGISTRY.collect_payload(full)
        if body is not None:
            self._send({"type": "metrics"}, body, timeout=-1 if deadline is None else deadline)

    # -- sending ----------------------------------------------------------------

    def _send_now(self, sock: socket.socket, header: protocol.Header, body: bytes = b"") -> None:
        frame = protocol.encode(header, body)
        with self._send_lock:
            sock.sendall(frame)

    def _send(self, header: protocol.Header, body: bytes = b"", timeout: float = -1) -> bool:
        """Send from any thread; False when not connected or the lock is not had in time."""
        sock = self._sock
        if sock is None:
            return False
        frame = protocol.encode(header, body)
        if not self._send_lock.acquire(timeout=timeout):
            return False
        try:
            sock.sendall(frame)
            return True
        except OSError:
            return False
        finally:
            self._send_lock.release()
