"""Access control for the HTTP API: a bearer token, a browser guard and, when asked for, CORS.

torch's WorkerServer has no access control at all; the sidecar relays calls
that can profile or dump any worker of the node, so with a token configured
every route except the probes and the metrics needs ``Authorization: Bearer``.

Without a token (loopback only) the network keeps other machines out, but not a
web page in a browser on the node: ``BrowserGuard`` refuses requests whose Host
is a name the sidecar is not reached by (DNS rebinding), and state-changing
requests sent by a page of another origin (cross-site form posts).
"""

from __future__ import annotations

import hmac
import ipaddress
import json

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from sidecar.http.page import is_page_path
from sidecar.values import is_decimal

# Probes and scrapes stay open by default: kubelets and Prometheus carry no token.
# The web page's own files are always open (sidecar/http/page.py): they hold no data.
OPEN_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
REALM = 'Bearer realm="rankside"'


async def send_error(
    send: Send, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """A ``{"error": message}`` JSON answer, as every route answers a refusal."""
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# Names a browser on the node reaches a loopback sidecar by.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Methods a cross-site page may trigger without CORS but that change nothing here.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def host_name(value: str) -> str | None:
    """The name in a Host header (``name``, ``name:port``, ``[v6]:port``), lower case.

    None when it is not one of those forms.
    """
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket:
            return None
    elif value.count(":") > 1:
        return value  # a bare IPv6 address, as some clients send it
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
    if rest and not (rest.startswith(":") and is_decimal(rest[1:])):
        return None
    return name or None


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class BrowserGuard:
    """Pure ASGI middleware: no DNS rebinding, no cross-site requests that change anything.

    ``check_host``: the Host header must be a loopback name, an IP address or
    the listen host, with any port. DNS rebinding needs a name its attacker
    controls, so a page can only send an IP address as Host when it was loaded
    from that address, that is from the sidecar itself; and the port is left
    free so that ``kubectl port-forward`` and ``ssh -L`` to another local port
    still work. With a token the check is off: a rebound page has no token,
    and probes, scrapes and other sidecars reach a pod by names no sidecar can
    know.

    Requests other than GET, HEAD and OPTIONS are refused with 403 when a
    browser says they come from a page of another origin: an ``Origin`` that is
    neither the sidecar's own (the Host it was asked by) nor a ``--cors-origin``,
    or none (``Origin: null``, which the sidecar's own page sends under its
    ``no-referrer`` policy) with a ``Sec-Fetch-Site`` other than ``same-origin``.
    Requests without either header (curl, the rankside client) are not a
    browser's and pass.
    """

    def __init__(
        self, app: ASGIApp, listen_host: str, check_host: bool, cors_origins: tuple[str, ...]
    ) -> None:
        self.app = app
        self.hosts = LOOPBACK_NAMES | {listen_host.lower()}
        self.check_host = check_host
        self.any_origin = "*" in cors_origins
        self.origins = frozenset(o.rstrip("/").lower() for o in cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key, value)
        host = headers.get(b"host", b"").decode("latin-1")
        if self.check_host and not self._host_allowed(host):
            await send_error(
                send,
                421,
                f"this sidecar is not reached by the name {host!r}: without a token it "
                "answers to localhost, 127.0.0.1, [::1] and IP addresses only",
            )
            return
        if scope["method"] not in SAFE_METHODS and self._cross_origin(headers, host):
            await send_error(
                send,
                403,
                "a page of another origin may not call this API: start the sidecar with "
                "--cors-origin ORIGIN to allow one",
            )
            return
        await self.app(scope, receive, send)

    def _host_allowed(self, host: str) -> bool:
        if not host:
            return True  # HTTP/1.0 without Host: no browser sends that
        name = host_name(host)
        return name is not None and (name in self.hosts or is_ip_address(name))

    def _cross_origin(self, headers: dict[bytes, bytes], host: str) -> bool:
        if self.any_origin:
            return False
        origin = headers.get(b"origin")
        site = headers.get(b"sec-fetch-site")
        if origin is not None and origin != b"null":
            text = origin.decode("latin-1").rstrip("/").lower()
            scheme, sep, netloc = text.partition("://")
            own = bool(sep) and scheme in ("http", "https") and netloc == host.lower()
            return not (own or text in self.origins)
        if site is None:
            # Origin: null from a browser that does not say where the page is.
            return origin is not None
        return site != b"same-origin"


class BearerAuth:
    """Pure ASGI middleware: 401 unless the request carries the token.

    The comparison is constant-time (``hmac.compare_digest``), so response
    timing does not tell how much of a guessed token was right.
    """

    def __init__(self, app: ASGIApp, token: str, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self.token = token.encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Lifespan scopes carry no path; only HTTP requests are checked.
        if scope["type"] != "http" or self._is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        problem = self._problem(scope)
        if problem is None:
            await self.app(scope, receive, send)
            return
        challenge = REALM if problem == "missing" else f'{REALM}, error="invalid_token"'
        message = (
            "this API needs Authorization: Bearer <token>"
            if problem == "missing"
            else "the bearer token is not valid"
        )
        await send_error(send, 401, message, ((b"www-authenticate", challenge.encode()),))

    def _is_open(self, path: str) -> bool:
        return path in self.open_paths or is_page_path(path)

    def _problem(self, scope: Scope) -> str | None:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if header is None:
            return "missing"
        scheme, _, credentials = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return "missing"
        if hmac.compare_digest(credentials.strip(), self.token):
            return None
        return "invalid"


def middleware(
    token: str | None, metrics_auth: bool, cors_origins: tuple[str, ...], listen_host: str
) -> list[Middleware]:
    """The browser guard outermost; then CORS, so preflights and 401s carry its
    headers; then the token check."""
    stack = [
        Middleware(
            BrowserGuard,
            listen_host=listen_host,
            check_host=token is None,
            cors_origins=cors_origins,
        )
    ]
    if cors_origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
                max_age=600,
            )
        )
    if token is not None:
        open_paths = frozenset() if metrics_auth else OPEN_PATHS
        stack.append(Middleware(BearerAuth, token=token, open_paths=open_paths))
    return stack
