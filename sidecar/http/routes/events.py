"""``/api/v1/events``: the node's recorded events, and their live Server-Sent Events stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sidecar.http.params import int_param, sidecar_of
from sidecar.node.events import Event
from sidecar.values import is_decimal

SSE_KEEPALIVE = 15.0


async def list_events(request: Request) -> Response:
    """Recorded events, newest first; ``?since=ID`` keeps those after event ID."""
    found = sidecar_of(request).events.newest_first(
        since=int_param(request, "since", 0), limit=int_param(request, "limit", 1000, 1)
    )
    return JSONResponse({"events": [e.to_json() for e in found]})


def _sse(event: Event) -> str:
    return f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(event.to_json())}\n\n"


async def stream_events(request: Request) -> Response:
    """Events as Server-Sent Events; resumes after ``Last-Event-ID`` or ``?since=``."""
    log = sidecar_of(request).events
    header = request.headers.get("last-event-id", "")
    # Without either, no backlog: only new events (-1, which no one can pass).
    since = int(header) if is_decimal(header) else int_param(request, "since", -1)
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
                except TimeoutError:
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


routes = [Route("/events", list_events), Route("/events/stream", stream_events)]
