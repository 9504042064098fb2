"""Job-wide routes: this sidecar asks the job's sidecars for the page's job view.

``rankside serve --target URL`` (repeated) or ``--dns NAME:PORT`` (a headless
Service) names them. The page only ever talks to its own sidecar, which asks
the others server-side with its own token: no CORS, and the browser holds one
token. The targets are fixed at start-up; no caller can point these routes at
an address of its choosing.
"""

from __future__ import annotations

import urllib.parse

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.client.http import AsyncClient, ClientError, Peers
from sidecar.client.job import NodeStatus, job_events_async, job_workers_async, owner_of
from sidecar.client.targets import Targets
from sidecar.config import Config
from sidecar.http.params import call_timeout, handler_params, int_param, read_body, sidecar_of
from sidecar.http.responses import relayed_headers

# A node that has not answered a listing within this many seconds is shown as
# unreachable: the page refreshes every few seconds and must not hang on one.
NODE_TIMEOUT = 5.0


def open_peers(config: Config) -> Peers | None:
    """The one HTTP client this sidecar asks the job's sidecars with, for the app's life.

    None when it has no targets: the job routes then answer 404 and ask no one.
    """
    if not (config.targets or config.target_dns):
        return None
    return Peers(config.token, NODE_TIMEOUT)


async def job_clients(request: Request) -> tuple[list[AsyncClient], list[NodeStatus]]:
    """A client per target sidecar (DNS resolved afresh), and names that did not resolve."""
    config = sidecar_of(request).config
    targets = Targets(config.targets, config.target_dns)
    client: Peers | None = getattr(request.app.state, "peers", None)
    if not targets or client is None:
        raise HTTPException(
            404,
            "this sidecar has no job targets: start it with --target URL (repeatable) or "
            "--dns NAME:PORT for the job-wide view",
        )
    urls, failed = await targets.aresolve()
    return [client.client(url) for url in urls], failed


async def job_workers(request: Request) -> Response:
    """Every worker of the job by global rank, with its node, and every node's status."""
    clients, failed = await job_clients(request)
    view = await job_workers_async(clients, failed)
    return JSONResponse(view.to_json())


async def job_events(request: Request) -> Response:
    """The newest events of every node, merged by time, newest first."""
    limit = int_param(request, "limit", 100, 1)
    clients, failed = await job_clients(request)
    view = await job_events_async(clients, limit, failed)
    return JSONResponse(view.to_json())


async def job_call(request: Request) -> Response:
    """Relay a handler call to whichever node runs worker ``{worker}``; its answer unchanged."""
    key = request.path_params["worker"]
    name = request.path_params["name"]
    timeout = call_timeout(request)
    params = [*handler_params(request), ("timeout", f"{timeout:g}")]
    body = await read_body(request)
    clients, failed = await job_clients(request)
    listing = await job_workers_async(clients, failed)
    node = owner_of(listing.workers, key)
    if node is None:
        down = ", ".join(n.url for n in listing.unreachable)
        raise HTTPException(
            404,
            f"no worker {key!r} on any node of the job"
            + (f" that answered (unreachable: {down})" if down else ""),
        )
    target = next(c for c in clients if c.url == node)
    path = (
        f"/api/v1/workers/{urllib.parse.quote(key, safe='')}"
        f"/handlers/{urllib.parse.quote(name, safe='')}"
    )
    try:
        reply = await target.request("POST", path, params, body, timeout + NODE_TIMEOUT)
    except ClientError as exc:
        raise HTTPException(502, str(exc)) from None
    # The node's answer is the worker's: it gets the same sandbox as on the node.
    return Response(
        reply.body,
        status_code=reply.status,
        headers={**relayed_headers(reply.content_type), "x-rankside-node": node},
    )


routes = [
    Route("/job/workers", job_workers),
    Route("/job/events", job_events),
    Route("/job/workers/{worker}/handlers/{name}", job_call, methods=["POST"]),
]
