"""Job-wide incidents over HTTP: asking the job's sidecars to capture, and keeping verdicts.

``JobPeers`` is the ``JobScope`` (sidecar/node/jobwide.py) a sidecar with job
targets is built with: a capture is ``POST /api/v1/diagnose?incident=ID&kind=K``
on every other sidecar at once, and the verdict goes back to each as
``PUT /api/v1/incidents/{id}`` (sidecar/http/routes/incidents.py). The route
``/api/v1/diagnose`` is the capturing end, and ``POST /api/v1/job/diagnose``
the same job-wide capture asked for by a person.

Every capture carries this sidecar's ``origin``: a sidecar that finds itself
among its own targets (a headless Service resolves to every pod, this one
included) answers its own origin with ``{"self": true}`` at once, rather than
capture twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import urllib.parse

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.client.http import AsyncClient, ClientError, Peers
from sidecar.client.targets import Targets
from sidecar.http.params import sidecar_of
from sidecar.node.incidents import (
    INCIDENT_ID,
    PYSPY_TIMEOUT,
    Incident,
    IncidentKind,
    new_incident_id,
)
from sidecar.node.jobwide import JobScope, NodeCapture, investigate_job
from sidecar.node.service import Sidecar

log = logging.getLogger("rankside.sidecar")

CAPTURE = "/api/v1/diagnose"
STRAGGLERS = "/api/v1/stragglers"


class JobPeers:
    """The job's other sidecars, asked through ``peers`` (one ``httpx.AsyncClient``)."""

    def __init__(self, targets: Targets, peers: Peers, capture_wait: float) -> None:
        self.targets = targets
        self.peers = peers
        # A node's capture: its workers' deadline, then py-spy for those that
        # did not answer, then a little for the answer to come back.
        self.capture_wait = capture_wait
        self.origin = secrets.token_hex(8)

    async def _clients(self) -> tuple[list[AsyncClient], list[NodeCapture]]:
        urls, failed = await self.targets.aresolve()
        return [self.peers.client(u) for u in urls], [
            NodeCapture(n.url, error=n.error) for n in failed
        ]

    async def capture(self, incident_id: str, kind: IncidentKind) -> list[NodeCapture]:
        clients, failed = await self._clients()
        params = [("incident", incident_id), ("kind", str(kind)), ("origin", self.origin)]

        async def one(client: AsyncClient) -> NodeCapture:
            try:
                reply = await client.request("POST", CAPTURE, params, b"", self.capture_wait)
                if reply.status != 200:
                    return NodeCapture(
                        client.url, error=f"HTTP {reply.status}: {reply.error_text()}"
                    )
                return NodeCapture(client.url, answer=reply.json())
            except (ClientError, ValueError) as exc:
                return NodeCapture(client.url, error=str(exc))

        answers = await asyncio.gather(*(one(c) for c in clients))
        mine = [a for a in answers if not (isinstance(a.answer, dict) and a.answer.get("self"))]
        return [*failed, *mine]

    async def publish(self, incident: Incident) -> None:
        clients, _ = await self._clients()
        # The verdict without each rank's evidence, which this node keeps.
        body = json.dumps(incident.to_json(evidence=False)).encode()
        path = f"/api/v1/incidents/{urllib.parse.quote(incident.id, safe='')}"

        async def one(client: AsyncClient) -> None:
            try:
                reply = await client.request("PUT", path, [("origin", self.origin)], body)
            except ClientError as exc:
                log.warning("could not send incident %s to %s: %s", incident.id, client.url, exc)
                return
            if reply.status not in (200, 204):
                log.warning(
                    "%s did not keep incident %s: HTTP %d %s",
                    client.url,
                    incident.id,
                    reply.status,
                    reply.error_text(),
                )

        await asyncio.gather(*(one(c) for c in clients))

    async def arrivals(self) -> list[NodeCapture]:
        clients, failed = await self._clients()

        async def one(client: AsyncClient) -> NodeCapture:
            try:
                answer = await client.get_json(STRAGGLERS, [("arrivals", "true")])
            except ClientError as exc:
                return NodeCapture(client.url, error=str(exc))
            return NodeCapture(client.url, answer=answer)

        return [*failed, *await asyncio.gather(*(one(c) for c in clients))]


def job_peers(
    sidecar_targets: Targets, peers: Peers | None, dump_timeout: float
) -> JobScope | None:
    """The job scope of a sidecar with targets; None (node scope) without."""
    if not sidecar_targets or peers is None:
        return None
    return JobPeers(sidecar_targets, peers, dump_timeout + PYSPY_TIMEOUT + 5.0)


# -- the routes ------------------------------------------------------------------------


def _kind_param(request: Request) -> IncidentKind:
    text = request.query_params.get("kind", IncidentKind.MANUAL)
    try:
        return IncidentKind(text)
    except ValueError:
        kinds = ", ".join(k.value for k in IncidentKind)
        raise HTTPException(400, f"kind={text[:40]!r} is none of {kinds}") from None


def _incident_param(request: Request, kind: IncidentKind) -> str:
    given = request.query_params.get("incident")
    if given is None:
        return new_incident_id(kind)
    if not INCIDENT_ID.fullmatch(given):
        raise HTTPException(400, f"incident={given[:80]!r} is not an incident id")
    return given


def _origin_is_me(sidecar: Sidecar, request: Request) -> bool:
    origin = request.query_params.get("origin")
    return sidecar.job is not None and origin is not None and origin == sidecar.job.origin


async def diagnose(request: Request) -> Response:
    """Capture this node now and answer its part: a ``manual`` incident, or (with
    ``incident`` and ``kind``) this node's part of another node's job incident."""
    sidecar = sidecar_of(request)
    kind = _kind_param(request)
    incident_id = _incident_param(request, kind)
    if _origin_is_me(sidecar, request):
        return JSONResponse({"self": True, "node": sidecar.config.node})
    opening = {
        IncidentKind.STALL: sidecar.stalls.incident,
        IncidentKind.FAILURE: sidecar.failures.incident,
    }
    # Joined, this node keeps its part under the asker's id; else (it keeps an
    # incident of its own of the same hang) it only answers what it captured.
    joined = opening[kind].adopt(incident_id, time.time()) if kind in opening else True
    incident = await sidecar.incidents.investigate(incident_id, kind, keep=joined)
    if kind is IncidentKind.MANUAL:
        # A manual look is no alert: it closes at once, so it names no culprit in metrics.
        sidecar.incidents.close_open(IncidentKind.MANUAL, incident.opened_at)
    return JSONResponse(incident.to_json())


async def job_diagnose(request: Request) -> Response:
    """Capture every node of the job now, and answer the job's verdict (``manual``)."""
    sidecar = sidecar_of(request)
    if sidecar.job is None:
        raise HTTPException(
            404,
            "this sidecar has no job targets: start it with --target URL (repeatable) or "
            "--dns NAME:PORT for job-wide diagnosis",
        )
    kind = IncidentKind.MANUAL
    incident = await investigate_job(sidecar.incidents, sidecar.job, new_incident_id(kind), kind)
    assert incident is not None
    sidecar.incidents.close_open(kind, incident.opened_at)
    return JSONResponse(incident.to_json())


routes = [
    Route("/diagnose", diagnose, methods=["POST"]),
    Route("/job/diagnose", job_diagnose, methods=["POST"]),
]
