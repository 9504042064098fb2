"""``/api/v1/workers``: the node's workers, one worker, its handlers, and calls to them.

``{worker}`` is a worker's key: its global rank, or ``pid-<pid>`` without one.
A call to a worker's handler is relayed by ``sidecar/http/relay.py``.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.http.params import sidecar_of
from sidecar.http.relay import RelayEndpoint
from sidecar.node.service import Sidecar
from sidecar.node.workers import Worker
from sidecar.schema import WorkerJSON

# Sampled by every worker from /proc/self/statm and pushed with its metrics.
RSS = "rankside_worker_resident_memory_bytes"


def worker_json(sidecar: Sidecar, worker: Worker) -> WorkerJSON:
    """A worker as the API shows it: its state, and its resident memory as last pushed."""
    return worker.to_json(sidecar.metric_store.value(worker.key, RSS))


async def list_workers(request: Request) -> Response:
    """Every worker, and the sidecar's clock: ages are computed against it, not the reader's."""
    sidecar = sidecar_of(request)
    workers = [worker_json(sidecar, w) for w in sidecar.workers.all()]
    return JSONResponse({"time": time.time(), "workers": workers})


async def get_worker(request: Request) -> Response:
    sidecar = sidecar_of(request)
    return JSONResponse(worker_json(sidecar, sidecar.worker(request.path_params["worker"])))


async def list_handlers(request: Request) -> Response:
    """The handler names the worker answers, as it last reported them."""
    worker = sidecar_of(request).worker(request.path_params["worker"])
    return JSONResponse({"worker": worker.key, "handlers": worker.handlers})


routes = [
    Route("/workers", list_workers),
    Route("/workers/{worker}", get_worker),
    Route("/workers/{worker}/handlers", list_handlers),
    Route("/workers/{worker}/handlers/{name}", RelayEndpoint(), methods=["POST"]),
]
