"""The two relay routes as pure ASGI: one worker's handler, called over HTTP.

``POST /api/v1/workers/{worker}/handlers/{name}`` and torch's
``POST /workers/{worker}/handler/{name}`` are the API's hot path: a person
or a tool calling ``ping`` or ``dump_traceback`` in a loop. Through
Starlette's router, its exception middleware, a ``Request`` and a
``Response`` they cost tens of microseconds a call beyond the relay itself,
so ``RelayRoutes`` answers them before the router, as the innermost of the
app's middleware: the browser guard, CORS and the token check
(``sidecar/http/access.py``) have run by then, exactly as for every other
route. The deadline, the parameters and the bounded body are read by the
functions every route uses (``sidecar/http/params.py``), refusals are the
same JSON errors, the answer carries the sandbox headers of every relayed
body (``send_relayed``), and ``Sidecar.call`` counts and times the call.

The routes stay in the router's table too, with the same endpoint
(``RelayEndpoint``): that table is what ``/openapi.json`` is checked against,
and what answers another method on their paths with a 405.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from sidecar.http.params import read_limited, timeout_of, without_timeout
from sidecar.http.responses import error_response, send_relayed
from sidecar.node.relay import RelayError
from sidecar.node.service import Sidecar

# The routes' paths as Starlette's router matches them: a path parameter
# is one or more characters other than "/", of the percent-decoded path.
RELAY_PATHS = (
    re.compile(r"/api/v1/workers/(?P<worker>[^/]+)/handlers/(?P<name>[^/]+)"),
    re.compile(r"/workers/(?P<worker>[^/]+)/handler/(?P<name>[^/]+)"),
)


async def relay(
    sidecar: Sidecar, scope: Scope, receive: Receive, send: Send, worker: str, name: str
) -> None:
    """Relay handler ``name`` to ``worker``; its answer, status and type, unchanged."""
    try:
        # As Starlette's QueryParams reads a query: the last value of a name wins.
        query = scope["query_string"]
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True) if query else []
        raw_timeout = None
        for key, value in pairs:
            if key == "timeout":
                raw_timeout = value
        config = sidecar.config
        timeout = timeout_of(config, raw_timeout)
        declared = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                declared = value.decode("latin-1")
                break
        body = await read_limited(receive, declared, config.max_body)
        reply = await sidecar.call(worker, name, without_timeout(pairs), body, timeout)
    except HTTPException as exc:
        await error_response(exc.status_code, exc.detail, exc.headers)(scope, receive, send)
        return
    except RelayError as exc:
        await error_response(exc.status, str(exc))(scope, receive, send)
        return
    await send_relayed(send, reply)


class RelayRoutes:
    """Pure ASGI middleware: the relay routes' POSTs answered here, the rest passed on."""

    def __init__(self, app: ASGIApp, sidecar: Sidecar) -> None:
        self.app = app
        self.sidecar = sidecar

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            path = scope["path"]
            for pattern in RELAY_PATHS:
                match = pattern.fullmatch(path)
                if match is not None:
                    await relay(self.sidecar, scope, receive, send, *match.groups())
                    return
        await self.app(scope, receive, send)


class RelayEndpoint:
    """The relay routes' endpoint in the router's table (see the module's docstring)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope["path_params"]
        sidecar: Sidecar = scope["app"].state.sidecar
        await relay(sidecar, scope, receive, send, params["worker"], params["name"])
