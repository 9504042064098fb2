"""``POST /api/v1/handlers/{name}``: one handler on many workers of the node at once."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.http.params import call_timeout, handler_params, read_body, sidecar_of
from sidecar.node import fanout
from sidecar.schema import WorkerState, parse_ranks, summarize


async def fan_out(request: Request) -> Response:
    """Call handler ``{name}`` on the workers in ``?ranks=`` (default: the live ones) at once.

    Without ``ranks=`` an ended worker, still listed for ``--grace``, is left
    out: it cannot answer, and one exit would make every fan-out partial for
    the whole grace period. Named in ``ranks=``, it is reported (503).
    """
    sidecar = sidecar_of(request)
    timeout = call_timeout(request)
    spec = request.query_params.get("ranks")
    if spec is None:
        keys = [w.key for w in sidecar.workers.all() if w.state is WorkerState.RUNNING]
    else:
        try:
            keys = [str(rank) for rank in parse_ranks(spec)]
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
    params = [(k, v) for k, v in handler_params(request) if k != "ranks"]
    body = await read_body(request)
    name = request.path_params["name"]
    results = await fanout.fan_out(sidecar, keys, name, params, body, timeout)
    return JSONResponse(
        {
            "handler": name,
            "timeout": timeout,
            "summary": summarize(results),
            "ranks": {key: result.to_json() for key, result in results.items()},
        }
    )


routes = [Route("/handlers/{name}", fan_out, methods=["POST"])]
