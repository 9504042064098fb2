"""``/workers/{worker}/...``: torch's per-worker ``_WorkerServer`` routes, answered alike.

A client written for torch's server works unchanged once it is pointed at
``http://sidecar/workers/{worker}``: the same paths, bodies and statuses.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.http.params import sidecar_of
from sidecar.http.relay import RelayEndpoint

# Byte for byte what torch's WorkerServer serves at "/".
TORCH_INDEX = '<h1>torch.distributed.WorkerServer</h1>\n<a href="/handler/">Handler names</a>\n'


async def torch_index(request: Request) -> Response:
    sidecar_of(request).worker(request.path_params["worker"])
    return Response(TORCH_INDEX, headers={"content-type": "text/html"})


async def torch_handler_names(request: Request) -> Response:
    worker = sidecar_of(request).worker(request.path_params["worker"])
    # Compact, as torch's server writes it.
    return Response(
        json.dumps(worker.handlers, separators=(",", ":")), media_type="application/json"
    )


routes = [
    Route("/{worker}/", torch_index),
    Route("/{worker}/handler/", torch_handler_names),
    Route("/{worker}/handler/{name}", RelayEndpoint(), methods=["POST"]),
]
