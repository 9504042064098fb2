"""The unix-socket server that workers connect to, on the sidecar's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

from sidecar.config import Config
from sidecar.metrics import own
from sidecar.node import events
from sidecar.node.events import EventLog
from sidecar.node.relay import PendingCalls, WorkerUnavailable
from sidecar.node.workers import DISCONNECTED, EXITED, WorkerRegistry, WorkerState
from sidecar.schema import Reply
from worker_hooks import protocol

log = logging.getLogger("rankside.sidecar")

_PEERCRED = struct.Struct("3i")  # pid, uid, gid
# Metrics payloads above this size are ingested in a thread, so that a big one
# does not hold up relayed calls. Measured (MetricStore.ingest, one core):
# about 90 us per KiB of changed values and 165 us per KiB of a full payload
# (a full one of 10k histogram series: ~127 ms); below 8 KiB, well under a
# millisecond, ingesting inline is cheaper than the hop to a thread.
INLINE_METRICS_BYTES = 8 * 1024
# Worker-supplied text kept in state, events and logs is cut to this length.
MAX_EXIT_TEXT = 4096

MetricsSink = Callable[[WorkerState, bytes], None]

# Bytes of call frames a worker may leave unread before further calls to it
# fail at once with 503 instead of being queued in the sidecar's memory.
WRITE_BACKLOG_LIMIT = 4 * 1024 * 1024


class SocketInUse(Exception):
    """The socket path is served by a live sidecar, or is not a socket at all."""


def bind_unix_socket(path: str, mode: int) -> socket.socket:
    """Bind a listening socket at ``path`` with file mode ``mode``.

    A stale file left by a dead sidecar is replaced; one that a live sidecar
    still answers on is refused, so two sidecars never split a node's workers.
    """
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("replacing stale socket file %s", path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except OSError as exc:
            raise SocketInUse(f"cannot check existing socket {path}: {exc}") from exc
        else:
            raise SocketInUse(
                f"another sidecar is already serving on {path}; stop it or choose another --socket"
            )
        finally:
            probe.close()
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask makes the file appear with ``mode`` already: no window in
    # which another user could connect before a chmod.
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(512)
    sock.setblocking(False)
    return sock


class WorkerConnection:
    """One connected worker process: reads its frames and carries calls to it."""

    def __init__(
        self,
        server: WorkerSocketServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer_pid: int | None = None,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        # From SO_PEERCRED, not from the worker's hello: what py-spy may attach to.
        self.peer_pid = peer_pid
        self.pending = PendingCalls()
        self.worker: WorkerState | None = None

    async def call(
        self, handler: str, params: list[tuple[str, str]], body: bytes, timeout: float
    ) -> Reply:
        """Send a ``call`` frame and wait up to ``timeout`` seconds for its reply."""
        if self.writer.is_closing():
            raise WorkerUnavailable("worker connection is closing")
        backlog = self.writer.transport.get_write_buffer_size()
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
        self.writer.write(protocol.encode(header, body))
        return await self.pending.wait(call_id, future, timeout)

    async def run(self) -> None:
        config = self.server.config
        try:
            try:
                header, _ = await asyncio.wait_for(self._read_frame(), config.handshake_timeout)
            except asyncio.TimeoutError:
                raise protocol.ProtocolError(
                    f"no hello within {config.handshake_timeout:g} s", "handshake_timeout"
                ) from None
            self._welcome(header)
            while True:
                header, body = await self._read_frame()
                if header["type"] == "metrics" and len(body) > INLINE_METRICS_BYTES:
                    await self._ingest_off_loop(body)
                else:
                    self._dispatch(header, body)
        except asyncio.IncompleteReadError:
            pass  # the worker closed its end, possibly mid-frame
        except ConnectionError:
            pass
        except protocol.ProtocolError as exc:
            self._reject(exc)
        except Exception as exc:
            # A frame that passed validation and still broke its handling is a
            # bug, but it must cost this one connection, not the sidecar's log
            # an unexplained traceback and the worker no error frame.
            log.exception("unexpected error handling a frame from %s", self._who())
            self._reject(protocol.ProtocolError(f"{type(exc).__name__}: {exc}", "malformed"))
        finally:
            self._closed()

    def _who(self) -> str:
        return self.worker.key if self.worker else "an unregistered peer"

    async def _ingest_off_loop(self, body: bytes) -> None:
        """Parse a large metrics payload in a thread, keeping the loop free for calls.

        The reader awaits it, so this connection's frames stay in order.
        """
        worker = self.worker
        assert worker is not None
        worker.last_seen = time.time()
        sink = self.server.metrics_sink
        if sink is not None and self.server.registry.is_current(worker):
            await asyncio.to_thread(sink, worker, body)

    async def _read_frame(self) -> tuple[protocol.Header, bytes]:
        prefix = await self.reader.readexactly(protocol.PREFIX_SIZE)
        # Lengths are checked before reading, so an oversize frame costs nothing.
        header_len, body_len = protocol.parse_prefix(prefix, self.server.config.max_frame)
        data = await self.reader.readexactly(header_len + body_len)
        header = protocol.parse_header(data[:header_len])
        own.observe_frame(header["type"])
        return header, data[header_len:]

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
        worker = WorkerState.from_hello(header["identity"], header["handlers"], time.time())
        worker.connection = self
        self.worker = worker
        previous = self.server.registry.register(worker)
        if previous is not None and previous.connection is not None:
            # Same key, new process: the old connection no longer speaks for it.
            previous.connection.pending.fail_all(WorkerUnavailable("worker was replaced"))
            previous.connection = None
        if previous is not None and previous.pid != worker.pid:
            self.server.events.record(
                events.RESTARTED,
                f"worker {worker.key} restarted as pid {worker.pid}"
                f" (restart count {worker.restart_count})",
                worker.key,
                pid=worker.pid,
                previous_pid=previous.pid,
                restart_count=worker.restart_count,
            )
        else:
            self.server.events.record(
                events.CONNECTED,
                f"worker {worker.key} connected (pid {worker.pid})",
                worker.key,
                pid=worker.pid,
                restart_count=worker.restart_count,
                reconnect=previous is not None,
            )
        self.writer.write(
            protocol.encode(
                {"type": "welcome", "version": protocol.PROTOCOL_VERSION, "key": worker.key}
            )
        )

    def _dispatch(self, header: protocol.Header, body: bytes) -> None:
        worker = self.worker
        assert worker is not None
        worker.last_seen = time.time()
        kind = header["type"]
        if kind != "reply" and not self.server.registry.is_current(worker):
            # A newer connection took this worker's key (a restarted rank): the
            # old one no longer speaks for it; only its late replies are read.
            return
        if kind == "heartbeat":
            worker.record_progress(header["step"], header["steps"], header["progress_time"])
        elif kind == "reply":
            reply = Reply(header["status"], header["content_type"], body)
            if not self.pending.resolve(header["id"], reply):
                log.debug("dropped a late reply %s from worker %s", header["id"], worker.key)
        elif kind == "metrics":
            sink = self.server.metrics_sink
            if sink is not None:
                sink(worker, body)
        elif kind == "handlers":
            worker.handlers = [n for n in header["names"] if isinstance(n, str)]
        elif kind == "bye":
            worker.exit = _exit_info(header)
            self.server.registry.end(worker, EXITED, worker.last_seen)
            own.observe_exit(worker.exit["reason"])
            self.server.events.record(
                events.EXITED, _exit_message(worker.key, worker.exit), worker.key, **worker.exit
            )
        elif kind == "error":
            log.warning("worker %s reported a protocol error: %s", worker.key, header["message"])
        else:
            raise protocol.ProtocolError(
                f"a worker may not send {kind!r} frames", "unexpected_type"
            )

    def _reject(self, exc: protocol.ProtocolError) -> None:
        key = self.worker.key if self.worker else None
        self.server.events.record(
            events.FRAME_REJECTED,
            f"closed the connection of {self._who()}: {exc}",
            key,
            reason=exc.reason,
        )
        own.observe_rejection(exc.reason)
        if not self.writer.is_closing():
            self.writer.write(protocol.encode({"type": "error", "message": str(exc)}))

    def _closed(self) -> None:
        self.pending.fail_all(WorkerUnavailable("worker disconnected"))
        worker = self.worker
        if worker is not None and worker.connection is self:
            self.server.registry.end(worker, DISCONNECTED, time.time())
            if worker.state == DISCONNECTED:
                own.observe_exit("disconnected")
                self.server.events.record(
                    events.DISCONNECTED,
                    f"worker {worker.key} disconnected without saying goodbye",
                    worker.key,
                    pid=worker.pid,
                )
        self.writer.close()


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


class WorkerSocketServer:
    """Accepts worker connections on a bound unix socket."""

    def __init__(
        self, sock: socket.socket, registry: WorkerRegistry, config: Config, event_log: EventLog
    ) -> None:
        self.sock = sock
        self.events = event_log
        self.path = config.socket_path
        self.registry = registry
        self.config = config
        self.metrics_sink: MetricsSink | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[WorkerConnection] = set()
        self._closed_all = asyncio.Event()
        self._inode = os.stat(self.path).st_ino
        self._rebind_failed = False

    @property
    def serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accept, sock=self.sock)

    async def check_socket(self) -> None:
        """Bind the socket again if its file is gone (its directory was cleaned up, say).

        Connected workers keep their connections without it, but a worker that
        starts or reconnects would never find the sidecar again. A file that is
        there but not ours is left alone: it is another sidecar's.
        """
        if self._server is None or os.path.lexists(self.path):
            return
        try:
            sock = bind_unix_socket(self.path, self.config.socket_mode)
        except (OSError, SocketInUse) as exc:
            if not self._rebind_failed:
                log.error("the worker socket %s is gone and cannot be bound: %s", self.path, exc)
            self._rebind_failed = True
            return
        self._rebind_failed = False
        previous, self.sock = self._server, sock
        self._server = await asyncio.start_unix_server(self._accept, sock=sock)
        previous.close()  # stops listening; connected workers are not touched
        self._inode = os.stat(self.path).st_ino
        self.events.record(
            events.SOCKET_RECREATED,
            f"the worker socket {self.path} had been removed; bound it again",
            path=self.path,
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        # Closing the transports ends each connection's read loop normally;
        # cancelling the tasks instead would make asyncio log them as errors.
        for connection in list(self._connections):
            connection.writer.close()
        if self._connections:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closed_all.wait(), 1.0)
        # Remove the file only if it is still ours, not a successor's.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_pid, refusal = self._check_peer(writer)
        if refusal is not None:
            self.events.record(events.FRAME_REJECTED, refusal, reason="peer_credentials")
            own.observe_rejection("peer_credentials")
            writer.write(protocol.encode({"type": "error", "message": refusal}))
            writer.close()
            return
        connection = WorkerConnection(self, reader, writer, peer_pid)
        self._connections.add(connection)
        self._closed_all.clear()
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)
            if not self._connections:
                self._closed_all.set()

    def _check_peer(self, writer: asyncio.StreamWriter) -> tuple[int | None, str | None]:
        """The peer's pid as the kernel reports it, and why it may not connect, if so.

        Only peers of our own uid (or an allowed uid or gid) may speak to us.
        The pid is 0 for a process in a pid namespace the sidecar cannot see.
        """
        sock = writer.get_extra_info("socket")
        if sock is None:
            return None, None
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        if uid in self.config.allowed_uids or gid in self.config.allowed_gids:
            return pid or None, None
        return pid or None, f"peer pid {pid} runs as uid {uid} gid {gid}, which may not connect"
