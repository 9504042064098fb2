"""HTTP routes: health, the worker list and relayed handler calls."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from sidecar.metrics.exposition import metrics_endpoint
from sidecar.node.events import Event
from sidecar.node.service import Sidecar
from sidecar.node.workers import WorkerState
from sidecar.values import is_decimal

# Sampled by every worker from /proc/self/statm and pushed with its metrics.
RSS = "rankside_worker_resident_memory_bytes"


def sidecar_of(request: Request) -> Sidecar:
    sidecar: Sidecar = request.app.state.sidecar
    return sidecar


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    if sidecar_of(request).ready:
        return PlainTextResponse("ok")
    return PlainTextResponse("worker socket is not accepting connections", status_code=503)


def worker_json(sidecar: Sidecar, worker: WorkerState) -> dict[str, Any]:
    """A worker as the API shows it: its state, and its resident memory as last pushed."""
    return {
        **worker.to_json(),
        "resident_memory_bytes": sidecar.metrics.store.value(worker.key, RSS),
    }


async def list_workers(request: Request) -> Response:
    """Every worker, and the sidecar's clock: ages are computed against it, not the reader's."""
    sidecar = sidecar_of(request)
    workers = [worker_json(sidecar, w) for w in sidecar.registry.all()]
    return JSONResponse({"time": time.time(), "workers": workers})


async def get_worker(request: Request) -> Response:
    sidecar = sidecar_of(request)
    return JSONResponse(worker_json(sidecar, sidecar.worker(request.path_params["rank"])))


def call_timeout(request: Request) -> float:
    """The call's deadline in seconds, from ``?timeout=``, within the configured maximum."""
    config = sidecar_of(request).config
    raw = request.query_params.get("timeout")
    if raw is None:
        return config.default_call_timeout
    try:
        timeout = float(raw)
    except ValueError:
        timeout = math.nan
    if not 0 < timeout <= config.max_call_timeout:
        raise HTTPException(
            400,
            f"parameter 'timeout' must be a number of seconds in (0, {config.max_call_timeout:g}]",
        )
    return timeout


def handler_params(request: Request) -> list[tuple[str, str]]:
    """Query parameters passed to the handler: all but the sidecar's own ``timeout``."""
    return [(k, v) for k, v in request.query_params.multi_items() if k != "timeout"]


async def read_body(request: Request, limit: int | None = None) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes without buffering it all."""
    if limit is None:
        limit = sidecar_of(request).config.max_body
    declared = request.headers.get("content-length")
    if declared is not None and is_decimal(declared) and int(declared) > limit:
        raise HTTPException(413, f"request body exceeds the {limit} byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body exceeds the {limit} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def call_handler(request: Request) -> Response:
    sidecar = sidecar_of(request)
    timeout = call_timeout(request)
    body = await read_body(request)
    reply = await sidecar.call(
        request.path_params["rank"],
        request.path_params["name"],
        handler_params(request),
        body,
        timeout,
    )
    # As a header, not media_type: Starlette would append "; charset=utf-8" to text/*.
    return Response(
        reply.body, status_code=reply.status, headers=relayed_headers(reply.content_type)
    )


def relayed_headers(content_type: str) -> dict[str, str]:
    """The worker's content type, in a sandbox: the body is the worker's, not the sidecar's.

    Every route that passes on a worker's body uses these, the job route too.
    A handler may answer text/html; served as is on the sidecar's origin, its
    script could call the API with the page's token. ``sandbox`` gives it an
    origin of its own with scripts off, and ``nosniff`` keeps a browser from
    reading other types as HTML.
    """
    return {
        "content-type": content_type,
        "content-security-policy": "sandbox",
        "x-content-type-options": "nosniff",
    }


def int_param(request: Request, name: str, default: int, minimum: int = 0) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise HTTPException(400, f"parameter {name!r} must be an integer >= {minimum}")
    return value


async def list_events(request: Request) -> Response:
    """Recorded events, newest first; ``?since=ID`` keeps those after event ID."""
    found = sidecar_of(request).events.newest_first(
        since=int_param(request, "since", 0), limit=int_param(request, "limit", 1000, 1)
    )
    return JSONResponse({"events": [e.to_json() for e in found]})


SSE_KEEPALIVE = 15.0


def _sse(event: Event) -> str:
    return f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(event.to_json())}\n\n"


async def stream_events(request: Request) -> Response:
    """Events as Server-Sent Events; resumes after ``Last-Event-ID`` or ``?since=``."""
    log = sidecar_of(request).events
    header = request.headers.get("last-event-id", "")
    since = int(header) if is_decimal(header) else int_param(request, "since", -1, -1)
    # Subscribe before reading the backlog: nothing falls between the two.
    subscription = log.subscribe()
    backlog = list(reversed(log.newest_first(since))) if since >= 0 else []

    async def stream() -> AsyncIterator[str]:
        try:
            for event in backlog:
                yield _sse(event)
            while True:
                try:
                    next_event = await asyncio.wait_for(subscription.queue.get(), SSE_KEEPALIVE)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if next_event is None:
                    return
                yield _sse(next_event)
        finally:
            subscription.close()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def list_dumps(request: Request) -> Response:
    """Dump files, newest first."""
    dumps = await asyncio.to_thread(sidecar_of(request).dumps.all)
    return JSONResponse({"dumps": [d.to_json() for d in dumps]})


async def get_dump(request: Request) -> Response:
    store = sidecar_of(request).dumps
    dump_id = request.path_params["id"]
    path = store.path_of(dump_id)
    described = store.describe(path) if path is not None else None
    if path is None or described is None:
        raise HTTPException(404, f"no dump {dump_id!r}")
    return FileResponse(path, media_type=described.content_type)


routes = [
    Route("/healthz", healthz),
    Route("/metrics", metrics_endpoint),
    Route("/readyz", readyz),
    Route("/api/v1/workers", list_workers),
    Route("/api/v1/workers/{rank}", get_worker),
    Route("/api/v1/workers/{rank}/handlers/{name}", call_handler, methods=["POST"]),
    Route("/api/v1/events", list_events),
    Route("/api/v1/events/stream", stream_events),
    Route("/api/v1/dumps", list_dumps),
    Route("/api/v1/dumps/{id}", get_dump),
]
