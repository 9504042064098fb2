"""The responses the routes build: JSON errors, relayed worker answers, multi-part bodies."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from sidecar.schema import Reply


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """``{"error": message}``: how every route answers a refusal."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


SANDBOX_HEADERS = {"content-security-policy": "sandbox", "x-content-type-options": "nosniff"}
_RAW_SANDBOX = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in SANDBOX_HEADERS.items()]
# Statuses Starlette gives no Content-Length (their responses have no body).
_NO_LENGTH = (204, 304)


def relayed_headers(content_type: str) -> dict[str, str]:
    """The worker's content type, in a sandbox: the body is the worker's, not the sidecar's.

    Every route that passes on a worker's body uses these, the job route too.
    A handler may answer text/html; served as is on the sidecar's origin, its
    script could call the API with the page's token. ``sandbox`` gives it an
    origin of its own with scripts off, and ``nosniff`` keeps a browser from
    reading other types as HTML.
    """
    return {"content-type": content_type, **SANDBOX_HEADERS}


async def send_relayed(send: Send, reply: Reply) -> None:
    """A worker's reply as the HTTP answer, with the sandbox headers (``relayed_headers``).

    Sent as its two ASGI messages, as Starlette's Response would send them
    (Content-Length but for 204 and 304), without building one: this is the
    relay routes' hot path (``sidecar/http/relay.py``).
    """
    headers = [(b"content-type", reply.content_type.encode("latin-1")), *_RAW_SANDBOX]
    if reply.status not in _NO_LENGTH:
        headers.append((b"content-length", str(len(reply.body)).encode("latin-1")))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


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
