"""``/api/v1/incidents`` and ``/api/v1/diagnose``: verdicts, kept and on demand."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.http.params import sidecar_of
from sidecar.node.incidents import IncidentKind


async def list_incidents(request: Request) -> Response:
    """Every incident kept, newest first."""
    incidents = sidecar_of(request).incidents.newest_first()
    return JSONResponse({"incidents": [i.to_json() for i in incidents]})


async def get_incident(request: Request) -> Response:
    incident_id = request.path_params["id"]
    incident = sidecar_of(request).incidents.get(incident_id)
    if incident is None:
        raise HTTPException(404, f"no incident {incident_id!r}")
    return JSONResponse(incident.to_json())


async def diagnose(request: Request) -> Response:
    """Capture this node's stacks now and answer the verdict (a ``manual`` incident)."""
    incidents = sidecar_of(request).incidents
    incident = await incidents.investigate(incidents.new_id("manual"), IncidentKind.MANUAL)
    # A manual look is no alert: it closes at once, so it names no culprit in metrics.
    incidents.close_open(IncidentKind.MANUAL, incident.opened_at)
    return JSONResponse(incident.to_json())


routes = [
    Route("/incidents", list_incidents),
    Route("/incidents/{id}", get_incident),
    Route("/diagnose", diagnose, methods=["POST"]),
]
