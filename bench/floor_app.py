"""The floor of any relay served by uvicorn: a pure ASGI app that answers ``pong``.

Served on the sidecar's own uvicorn configuration (uvloop and httptools as
uvicorn picks them, rankside's bounded httptools protocol, no access log), so
that what a relayed call costs beyond this app is the relay's own cost.
``bench/bench_relay.py`` starts it beside the sidecar:

    .venv/bin/python bench/floor_app.py PORT
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn

from sidecar.cli.serve import bind_http
from sidecar.config import Config
from sidecar.http.limits import http_protocol

Message = MutableMapping[str, Any]
_HEAD = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json"), (b"content-length", b"6")],
}
_BODY = {"type": "http.response.body", "body": b'"pong"'}


async def app(
    scope: Message,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """Answer every HTTP request with ``"pong"``, reading its body first as any route would."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send(_HEAD)
    await send(_BODY)


def main() -> int:
    """Serve ``app`` on 127.0.0.1:PORT until SIGTERM."""
    defaults = Config(socket_path="")  # only its defaults are read
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
            **http_protocol(defaults.header_timeout, defaults.max_connections),
        )
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    server.run(sockets=[bind_http("127.0.0.1", int(sys.argv[1]))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
