"""``/api/v1/stragglers`` and ``/api/v1/job/stragglers``: every rank's arrival lag.

Both answer ``ranks`` (each rank's median lag behind its groups' median
arrival, with its node and the number of collectives it is a median of) and
``stragglers`` (the ranks named, each with ``rank``, ``node``,
``lag_seconds`` and a ``reason``), empty when none is. The node route weighs
this node's ranks; ``?arrivals=true`` adds the enqueue times it weighed,
which is what the job route asks every node for, to weigh the job's ranks
together (sidecar/node/stragglers.py).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.http.params import sidecar_of
from sidecar.node.stragglers import lags, node_arrivals


def _flag(request: Request, name: str) -> bool:
    text = request.query_params.get(name, "false")
    if text not in ("true", "false"):
        raise HTTPException(400, f"{name}={text[:40]!r} is neither true nor false")
    return text == "true"


async def stragglers(request: Request) -> Response:
    """This node's ranks' lags and stragglers."""
    sidecar = sidecar_of(request)
    with_arrivals = _flag(request, "arrivals")
    arrivals = node_arrivals(sidecar.workers, sidecar.config.node)
    answer = lags(arrivals).to_json()
    if with_arrivals:
        answer["arrivals"] = [a.to_json() for a in arrivals]
    return JSONResponse(answer)


async def job_stragglers(request: Request) -> Response:
    """Every rank of the job weighed together; the nodes that gave no arrivals."""
    watch = sidecar_of(request).stragglers
    if watch.job is None:
        raise HTTPException(
            404,
            "this sidecar has no job targets: start it with --target URL (repeatable) or "
            "--dns NAME:PORT for the job's stragglers",
        )
    arrivals, missing = await watch.job_arrivals()
    return JSONResponse({**lags(arrivals).to_json(), "unreachable_nodes": missing})


routes = [
    Route("/stragglers", stragglers),
    Route("/job/stragglers", job_stragglers),
]
