"""The Starlette application: routes, JSON errors and the sidecar's lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from sidecar.http import job
from sidecar.http.access import middleware
from sidecar.http.responses import error_response
from sidecar.http.routes import routes
from sidecar.node.relay import RelayError
from sidecar.node.service import Sidecar

log = logging.getLogger("rankside.sidecar")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    # Keep the exception's headers: a 405 must say what is Allowed (RFC 9110).
    return error_response(exc.status_code, exc.detail, exc.headers)


async def _relay_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RelayError)
    return error_response(exc.status, str(exc))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}")


def create_app(sidecar: Sidecar) -> Starlette:
    """Build the HTTP app around ``sidecar``; its lifespan starts and stops the sidecar."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await sidecar.start()
        try:
            async with job.peers(sidecar.config) as peers:
                app.state.peers = peers
                yield
        finally:
            await sidecar.stop()

    config = sidecar.config
    app = Starlette(
        routes=routes,
        middleware=middleware(
            config.token, config.metrics_auth, config.cors_origins, config.host_port[0]
        ),
        lifespan=lifespan,
        exception_handlers={
            HTTPException: _http_error,
            RelayError: _relay_error,
            Exception: _internal_error,
        },
    )
    app.state.sidecar = sidecar
    return app
