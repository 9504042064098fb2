"""The web page at ``GET /``: static files shipped in the package, under a strict CSP.

The page holds no data: it is the same bytes for everyone, and loads
everything it shows from the API with the token the user gives it. So it is
served without a token (sidecar/http/access.py lets ``/`` and ``/static/`` through),
which is what lets it ask for one.

Nothing a worker reports is ever parsed as HTML: the scripts build every
element with createElement and fill it with textContent (the canvas plots draw
numbers only). The Content-Security-Policy
is the second line: no inline script, no script or connection to any other
origin, so that even a mistake there could not run injected code.
"""

from __future__ import annotations

from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

STATIC = Path(__file__).resolve().parent / "static"

# Only these files are served: a fixed list, not a directory, so nothing else
# in the package can be read through /static/.
SCRIPTS = ("app.js", "grid.js", "incident.js", "plots.js")
FILES = {
    **{name: "text/javascript; charset=utf-8" for name in SCRIPTS},
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    # Revalidated on every load (cheap: ETag), so an upgraded sidecar's page
    # never runs with the previous version's script.
    "cache-control": "no-cache",
}


def is_page_path(path: str) -> bool:
    """Paths of the page itself, which carry no data and need no token."""
    return path == "/" or path.startswith("/static/")


async def index(request: Request) -> Response:
    return FileResponse(
        STATIC / "index.html", media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS
    )


async def static_file(request: Request) -> Response:
    name = request.path_params["name"]
    media_type = FILES.get(name)
    if media_type is None:
        raise HTTPException(404, f"no static file {name!r}")
    return FileResponse(STATIC / name, media_type=media_type, headers=SECURITY_HEADERS)


routes = [
    Route("/", index),
    Route("/static/{name}", static_file),
]
