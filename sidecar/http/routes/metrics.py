"""``GET /metrics`` for Prometheus: the exposition, sent in parts, gzipped when asked."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.http.params import sidecar_of
from sidecar.http.responses import PartsResponse


async def metrics(request: Request) -> Response:
    result = await sidecar_of(request).exposition.scrape(
        request.headers.get("accept", ""), request.headers.get("accept-encoding", "")
    )
    headers = {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"} if result.gzipped else {}
    return PartsResponse(result.parts, result.content_type, headers)


routes = [Route("/metrics", metrics)]
