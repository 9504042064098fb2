"""``rankside serve``: the node server and its HTTP app on one uvicorn event loop."""

from __future__ import annotations

import signal
import sys

import uvicorn

from sidecar.config import Config
from sidecar.http.app import create_app
from sidecar.http.limits import http_protocol
from sidecar.node.service import Sidecar
from sidecar.node.socket_server import SocketInUse, bind_unix_socket


def serve(config: Config) -> int:
    """Run the sidecar until SIGTERM or SIGINT; 0 after a clean stop, 1 when it cannot start."""
    try:
        listener = bind_unix_socket(config.socket_path, config.socket_mode)
    except (SocketInUse, OSError) as exc:
        print(f"rankside: {exc}", file=sys.stderr)
        return 1
    host, port = config.host_port
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(Sidecar(config, listener)),
            host=host,
            port=port,
            log_level=config.log_level,
            access_log=False,
            lifespan="on",
            # Shut down within the 2 s a pod's preStop budget expects.
            timeout_graceful_shutdown=1,
            **http_protocol(),
        )
    )
    # uvicorn re-raises the signal that stopped it once it has shut down; a
    # no-op handler underneath makes SIGTERM and SIGINT a clean exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    server.run()
    return 0 if server.started else 1
