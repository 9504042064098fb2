"""``rankside serve``: the node server and its HTTP app on one uvicorn event loop.

The HTTP port is bound first, then the worker socket, and only then does the
app's lifespan start accepting workers: a sidecar that cannot have its port
(another sidecar holds it) fails before any worker could connect to it, and
never leaves workers registered with a sidecar nobody can reach.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import sys

import uvicorn

from sidecar.config import Config
from sidecar.http.app import build
from sidecar.http.limits import http_protocol
from sidecar.node.socket_server import SocketInUse, bind_unix_socket

log = logging.getLogger("rankside.sidecar")

# uvicorn's default listen backlog.
BACKLOG = 2048


def bind_http(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (the first address a name resolves to)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        # As asyncio and uvicorn do: a restarted sidecar may rebind at once,
        # while a port another process listens on is still refused.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def serve(config: Config) -> int:
    """Run the sidecar until SIGTERM or SIGINT; 0 after a clean stop, 1 when it cannot start."""
    host, port = config.host_port
    try:
        http_socket = bind_http(host, port)
    except OSError as exc:
        print(
            f"rankside: cannot listen on {config.listen}: {exc.strerror or exc}"
            + ("; is another sidecar running there?" if exc.errno == errno.EADDRINUSE else ""),
            file=sys.stderr,
        )
        return 1
    try:
        listener = bind_unix_socket(config.socket_path, config.socket_mode)
    except (SocketInUse, OSError) as exc:
        http_socket.close()
        print(f"rankside: {exc}", file=sys.stderr)
        return 1
    server = uvicorn.Server(
        uvicorn.Config(
            build(config, listener),
            log_level=config.log_level,
            access_log=False,
            lifespan="on",
            # Shut down within the 2 s a pod's preStop budget expects.
            timeout_graceful_shutdown=1,
            **http_protocol(config.header_timeout, config.max_connections),
        )
    )
    # uvicorn re-raises the signal that stopped it once it has shut down; a
    # no-op handler underneath makes SIGTERM and SIGINT a clean exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    bound_host, bound_port = http_socket.getsockname()[:2]
    log.info("serving HTTP on %s port %d", bound_host, bound_port)
    server.run(sockets=[http_socket])
    return 0 if server.started else 1
