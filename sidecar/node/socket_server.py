"""The unix socket workers connect to: binding it safely, and accepting peers.

``bind_unix_socket`` creates the socket file with its mode already set and
refuses to take over a live sidecar's path; ``WorkerSocketServer`` accepts
connections on it, checks each peer's uid and gid (SO_PEERCRED), runs one
``WorkerConnection`` per worker, and binds the path again if its file is
removed while the sidecar runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Set

from sidecar.metrics import own
from sidecar.node.connection import ConnectionContext, WorkerConnection, refuse
from sidecar.node.events import EventKind
from sidecar.node.frames import FrameStream

log = logging.getLogger("rankside.sidecar")

_PEERCRED = struct.Struct("3i")  # pid, uid, gid


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


class WorkerSocketServer:
    """Accepts worker connections on a bound unix socket."""

    def __init__(
        self,
        sock: socket.socket,
        path: str,
        mode: int,
        context: ConnectionContext,
        allowed_uids: Set[int],
        allowed_gids: Set[int] = frozenset(),
    ) -> None:
        self.sock = sock
        self.path = path
        self.mode = mode
        self.context = context
        self.events = context.events
        self.allowed_uids = allowed_uids
        self.allowed_gids = allowed_gids
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[WorkerConnection] = set()
        self._closed_all = asyncio.Event()
        self._inode = os.stat(self.path).st_ino
        self._rebind_failed = False

    @property
    def serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        self._server = await asyncio.get_running_loop().create_unix_server(
            self._stream, sock=self.sock
        )

    async def check_socket(self) -> None:
        """Bind the socket again if its file is gone (its directory was cleaned up, say).

        Connected workers keep their connections without it, but a worker that
        starts or reconnects would never find the sidecar again. A file that is
        there but not ours is left alone: it is another sidecar's.
        """
        if self._server is None or os.path.lexists(self.path):
            return
        try:
            sock = bind_unix_socket(self.path, self.mode)
        except (OSError, SocketInUse) as exc:
            if not self._rebind_failed:
                log.error("the worker socket %s is gone and cannot be bound: %s", self.path, exc)
            self._rebind_failed = True
            return
        self._rebind_failed = False
        previous, self.sock = self._server, sock
        self._server = await asyncio.get_running_loop().create_unix_server(self._stream, sock=sock)
        previous.close()  # stops listening; connected workers are not touched
        self._inode = os.stat(self.path).st_ino
        self.events.record(
            EventKind.SOCKET_RECREATED,
            f"the worker socket {self.path} had been removed; bound it again",
            path=self.path,
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        # Closing the transports ends each connection's read loop normally;
        # cancelling the tasks instead would make asyncio log them as errors.
        for connection in list(self._connections):
            connection.close()
        if self._connections:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closed_all.wait(), 1.0)
        # Remove the file only if it is still ours, not a successor's.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    def _stream(self) -> FrameStream:
        return FrameStream(self.context.max_frame, self._accept)

    async def _accept(self, stream: FrameStream) -> None:
        peer_pid, refusal = self._check_peer(stream.transport)
        if refusal is not None:
            self.events.record(EventKind.FRAME_REJECTED, refusal, reason="peer_credentials")
            own.observe_rejection("peer_credentials")
            await refuse(stream, refusal)
            return
        connection = WorkerConnection(self.context, stream, peer_pid)
        self._connections.add(connection)
        self._closed_all.clear()
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)
            if not self._connections:
                self._closed_all.set()

    def _check_peer(self, transport: asyncio.Transport) -> tuple[int | None, str | None]:
        """The peer's pid as the kernel reports it, and why it may not connect, if so.

        Only peers of our own uid (or an allowed uid or gid) may speak to us.
        The pid is 0 for a process in a pid namespace the sidecar cannot see.
        """
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None, None
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        if uid in self.allowed_uids or gid in self.allowed_gids:
            return pid or None, None
        return pid or None, (
            f"peer pid {pid} runs as uid {uid} gid {gid}, which may not connect: "
            f"start the sidecar with --allow-uid {uid} (or --allow-gid {gid}) to admit it"
        )
