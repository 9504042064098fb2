"""HTTP routes of the control plane: handler lists, fan-out and torch's WorkerServer paths.

``/workers/{rank}/...`` answers exactly as torch's per-worker ``_WorkerServer``
does at ``/...``, so a client written for torch's server works unchanged once
it is pointed at ``http://sidecar/workers/{rank}``.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.http.openapi import openapi_json
from sidecar.http.routes import call_handler, call_timeout, handler_params, read_body, sidecar_of
from sidecar.node import fanout
from sidecar.schema import parse_ranks, summarize

# Byte for byte what torch's WorkerServer serves at "/".
TORCH_INDEX = '<h1>torch.distributed.WorkerServer</h1>\n<a href="/handler/">Handler names</a>\n'


async def list_handlers(request: Request) -> Response:
    """The handler names worker ``{rank}`` answers, as it last reported them."""
    worker = sidecar_of(request).worker(request.path_params["rank"])
    return JSONResponse({"worker": worker.key, "handlers": worker.handlers})


async def fan_out(request: Request) -> Response:
    """Call handler ``{name}`` on the workers in ``?ranks=`` (default all) at once."""
    sidecar = sidecar_of(request)
    timeout = call_timeout(request)
    spec = request.query_params.get("ranks")
    if spec is None:
        keys = [w.key for w in sidecar.registry.all()]
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


async def torch_index(request: Request) -> Response:
    sidecar_of(request).worker(request.path_params["rank"])
    return Response(TORCH_INDEX, headers={"content-type": "text/html"})


async def torch_handler_names(request: Request) -> Response:
    worker = sidecar_of(request).worker(request.path_params["rank"])
    # Compact, as torch's server writes it.
    return Response(
        json.dumps(worker.handlers, separators=(",", ":")), media_type="application/json"
    )


routes = [
    Route("/openapi.json", openapi_json),
    Route("/api/v1/handlers/{name}", fan_out, methods=["POST"]),
    Route("/api/v1/workers/{rank}/handlers", list_handlers),
    Route("/workers/{rank}/", torch_index),
    Route("/workers/{rank}/handler/", torch_handler_names),
    Route("/workers/{rank}/handler/{name}", call_handler, methods=["POST"]),
]
