"""The responses the routes build: JSON errors, relayed worker answers, multi-part bodies."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from sidecar.schema import Reply


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """``{"error": message}``: how every route answers a refusal."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


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


def relayed_response(reply: Reply, headers: Mapping[str, str] | None = None) -> Response:
    """A worker's reply as the HTTP answer, with the sandbox headers."""
    # As a header, not media_type: Starlette would append "; charset=utf-8" to text/*.
    return Response(
        reply.body,
        status_code=reply.status,
        headers={**relayed_headers(reply.content_type), **(headers or {})},
    )


class PartsResponse(Response):
    """A response whose body goes out as several ASGI messages, never joined."""

    def __init__(self, parts: tuple[bytes, ...], media_type: str, headers: dict[str, str]) -> None:
        self.parts = parts
        length = str(sum(len(part) for part in parts))
        super().__init__(None, media_type=media_type, headers={**headers, "Content-Length": length})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        last = len(self.parts) - 1
        for i, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})
