"""``/api/v1/incidents``: the verdicts kept (sidecar/http/job_incidents.py makes them on demand)."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.http.params import read_body, sidecar_of
from sidecar.node.incidents import Incident


async def list_incidents(request: Request) -> Response:
    """Every incident kept, newest first."""
    incidents = sidecar_of(request).incidents.newest_first()
    return JSONResponse({"incidents": [i.to_json() for i in incidents]})


async def incident(request: Request) -> Response:
    """GET one incident; PUT keeps a job incident another sidecar of the job decided."""
    if request.method == "PUT":
        return await keep_incident(request)
    incident_id = request.path_params["id"]
    incident = sidecar_of(request).incidents.get(incident_id)
    if incident is None:
        raise HTTPException(404, f"no incident {incident_id!r}")
    return JSONResponse(incident.to_json())


async def keep_incident(request: Request) -> Response:
    """Keep the job's verdict that another sidecar of the job reached."""
    sidecar = sidecar_of(request)
    body = await read_body(request)
    try:
        incident = Incident.from_json(json.loads(body))
    except (ValueError, TypeError) as exc:
        raise HTTPException(400, f"not an incident: {exc}") from None
    if incident.id != request.path_params["id"]:
        raise HTTPException(409, f"the body is incident {incident.id!r}, not the one in the path")
    sidecar.incidents.keep(incident)
    return JSONResponse({"kept": incident.id})


routes = [
    Route("/incidents", list_incidents),
    Route("/incidents/{id}", incident, methods=["GET", "PUT"]),
]
