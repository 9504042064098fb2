"""``/api/v1/dumps``: the node's dump files, newest first, and each one's content."""

from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from sidecar.http.params import sidecar_of


async def list_dumps(request: Request) -> Response:
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


routes = [Route("/dumps", list_dumps), Route("/dumps/{id}", get_dump)]
