"""The Starlette application: routes, JSON errors and the sidecar's lifespan."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from sidecar.client.http import Peers
from sidecar.client.targets import Targets
from sidecar.config import Config
from sidecar.http import job
from sidecar.http.access import middleware
from sidecar.http.job_incidents import job_peers
from sidecar.http.relay import RelayRoutes
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


def build(config: Config, listener: socket.socket) -> Starlette:
    """The sidecar for ``config`` and its app: with job targets, one client for the
    job's sidecars, which both the job routes and the job-wide incidents use."""
    peers = job.open_peers(config)
    scope = job_peers(Targets(config.targets, config.target_dns), peers, config.dump_timeout)
    return create_app(Sidecar(config, listener, scope), peers)


def create_app(sidecar: Sidecar, peers: Peers | None = None) -> Starlette:
    """Build the HTTP app around ``sidecar``; its lifespan starts and stops the sidecar."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.peers = peers
        await sidecar.start()
        try:
            yield
        finally:
            await sidecar.stop()
            if peers is not None:
                await peers.aclose()

    config = sidecar.config
    app = Starlette(
        routes=routes,
        middleware=[
            *middleware(
                config.token, config.metrics_auth, config.cors_origins, config.host_port[0]
            ),
            # Innermost: every access check has passed when it answers a relayed call.
            Middleware(RelayRoutes, sidecar=sidecar),
        ],
        lifespan=lifespan,
        exception_handlers={
            HTTPException: _http_error,
            RelayError: _relay_error,
            Exception: _internal_error,
        },
    )
    app.state.sidecar = sidecar
    return app
