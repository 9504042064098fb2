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

import argparse
import hmac
import ipaddress
import json
import logging
import os
import stat
from typing import Any

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from sidecar.config import parse_listen
from sidecar.http.page import is_page_path

# Probes and scrapes stay open by default: kubelets and Prometheus carry no token.
# The web page's own files are always open (sidecar/http/page.py): they hold no data.
OPEN_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
REALM = 'Bearer realm="rankside"'

log = logging.getLogger("rankside.sidecar")


class TokenError(Exception):
    """The token file is unusable."""


def read_token(path: str, warn_if_shared: bool = True) -> str:
    """The token in ``path``: the whole file without surrounding whitespace, not empty.

    The sidecar warns when others may read the file; the command-line client,
    which only sends the token, reads it with ``warn_if_shared=False``.
    """
    try:
        with open(path, encoding="utf-8") as fp:
            token = fp.read().strip()
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise TokenError(f"cannot read the token file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise TokenError(f"cannot read the token file {path}: {exc}") from None
    if not token:
        raise TokenError(f"the token file {path} is empty")
    if warn_if_shared and mode & (stat.S_IRGRP | stat.S_IROTH):
        # Not fatal: a Kubernetes secret is mounted 0644 unless told otherwise.
        log.warning("the token file %s is readable by other users (mode %o)", path, mode & 0o777)
    return token


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts local connections (``localhost`` counts)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: it may well resolve to a public address


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


def is_decimal(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts '²' and other digits int() refuses."""
    return text.isascii() and text.isdigit()


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


def add_access_options(parser: argparse.ArgumentParser) -> None:
    """The access-control options of ``rankside serve``."""
    parser.add_argument(
        "--token-file",
        default=os.environ.get("RANKSIDE_TOKEN_FILE"),
        help="file holding the bearer token the API requires (env RANKSIDE_TOKEN_FILE)",
    )
    parser.add_argument(
        "--metrics-auth",
        action="store_true",
        help="require the token for /metrics, /healthz and /readyz too",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening on a non-loopback address without a token",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let a browser page from ORIGIN call the API (repeatable; '*' for any)",
    )
    parser.add_argument(
        "--max-body",
        type=int,
        default=1024 * 1024,
        help="largest request body accepted, in bytes (default 1 MiB)",
    )


def access_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Config fields from the access options; SystemExit when they are unsafe or broken."""
    token = None
    if args.token_file:
        try:
            token = read_token(args.token_file)
        except TokenError as exc:
            raise SystemExit(f"rankside: {exc}") from None
    host, _ = parse_listen(args.listen)
    if token is None and not is_loopback(host) and not args.insecure:
        raise SystemExit(
            f"rankside: refusing to listen on {args.listen} without a token: anyone who can "
            "reach it could profile and dump every worker. Pass --token-file "
            "(or RANKSIDE_TOKEN_FILE), listen on 127.0.0.1, or pass --insecure."
        )
    if args.max_body <= 0:
        raise SystemExit("rankside: --max-body must be positive")
    return {
        "token": token,
        "metrics_auth": args.metrics_auth,
        "insecure": args.insecure,
        "cors_origins": tuple(args.cors_origin),
        "max_body": args.max_body,
    }
