"""Every route of the sidecar, grouped by resource; the API under one ``/api/v1`` mount."""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount

from sidecar.http import job, job_incidents, openapi, page
from sidecar.http.routes import (
    dumps,
    events,
    handlers,
    health,
    incidents,
    metrics,
    torch,
    workers,
)

routes: list[BaseRoute] = [
    *page.routes,
    *health.routes,
    *metrics.routes,
    *openapi.routes,
    Mount(
        "/api/v1",
        routes=[
            *workers.routes,
            *handlers.routes,
            *events.routes,
            *dumps.routes,
            *incidents.routes,
            *job_incidents.routes,
            *job.routes,
        ],
    ),
    Mount("/workers", routes=torch.routes),
]
