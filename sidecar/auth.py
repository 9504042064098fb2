"""Access control for the HTTP API: a bearer token and, when asked for, CORS.

torch's WorkerServer has no access control at all; the sidecar relays calls
that can profile or dump any worker of the node, so with a token configured
every route except the probes and the metrics needs ``Authorization: Bearer``.
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

from .config import parse_listen
from .page import is_page_path

# Probes and scrapes stay open by default: kubelets and Prometheus carry no token.
# The web page's own files are always open (sidecar/page.py): they hold no data.
OPEN_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
REALM = 'Bearer realm="rankside"'

log = logging.getLogger("rankside.sidecar")


class TokenError(Exception):
    """The token file is unusable."""


def read_token(path: str) -> str:
    """The token in ``path``, without surrounding whitespace; it may not be empty."""
    try:
        with open(path, encoding="utf-8") as fp:
            token = fp.read().strip()
        mode = os.stat(path).st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenError(f"cannot read the token file {path}: {exc}") from None
    if not token:
        raise TokenError(f"the token file {path} is empty")
    if mode & (stat.S_IRGRP | stat.S_IROTH):
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
        body = json.dumps({"error": message}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", challenge.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

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
    token: str | None, metrics_auth: bool, cors_origins: tuple[str, ...]
) -> list[Middleware]:
    """CORS outermost, so preflights and 401s carry its headers; then the token check."""
    stack: list[Middleware] = []
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
