"""``/healthz`` and ``/readyz``: the probes a kubelet calls without a token.

Both carry the sidecar's process id in ``X-Rankside-Pid``, so that whoever
started a sidecar (``rankside run``, the demo) can tell its own from another
one already listening on the same port.
"""

from __future__ import annotations

import os

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sidecar.http.params import sidecar_of
from sidecar.schema import PID_HEADER


def _probe(text: str, status: int = 200) -> Response:
    return PlainTextResponse(text, status_code=status, headers={PID_HEADER: str(os.getpid())})


async def healthz(request: Request) -> Response:
    return _probe("ok")


async def readyz(request: Request) -> Response:
    if sidecar_of(request).ready:
        return _probe("ok")
    return _probe("worker socket is not accepting connections", 503)


routes = [Route("/healthz", healthz), Route("/readyz", readyz)]
