"""``/healthz`` and ``/readyz``: the probes a kubelet calls without a token."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sidecar.http.params import sidecar_of


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    if sidecar_of(request).ready:
        return PlainTextResponse("ok")
    return PlainTextResponse("worker socket is not accepting connections", status_code=503)


routes = [Route("/healthz", healthz), Route("/readyz", readyz)]
