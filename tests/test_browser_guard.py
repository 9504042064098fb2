"""A browser on the node cannot drive a sidecar through a web page of another site.

Without a token the sidecar listens on loopback only, which keeps other
machines out but not a page open in a browser on the node: DNS rebinding gives
the page a name that resolves to 127.0.0.1, and a cross-site form post needs no
CORS preflight. The Host check refuses the first, the Origin check the second.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, SidecarProcess, wait_for, write_token_file

SidecarFactory = Callable[..., SidecarProcess]
TOKEN = "guard-test-token"
EVIL = "http://evil.example"
DASHBOARD = "http://dashboard.example"

# A worker whose handler ``touch`` appends a line to $MARK: it shows whether a call got through.
TOUCH_WORKER = (
    "import os, time, worker_hooks\n"
    "def touch(request):\n"
    "    with open(os.environ['MARK'], 'a') as fp:\n"
    "        fp.write('called\\n')\n"
    "    return worker_hooks.Response('touched')\n"
    "worker_hooks.register_handler('touch', touch)\n"
    "with worker_hooks.worker_main():\n"
    "    while True:\n"
    "        time.sleep(0.05)\n"
    "        worker_hooks.step()\n"
)

HANDLER_POSTS = [
    "/api/v1/workers/0/handlers/touch",
    "/workers/0/handler/touch",
    "/api/v1/handlers/touch",
]


class Guarded:
    def __init__(self, side: SidecarProcess, mark: Path) -> None:
        self.side = side
        self.mark = mark

    def calls(self) -> int:
        return len(self.mark.read_text().splitlines()) if self.mark.exists() else 0


def start(factory: SidecarFactory, tmp_path: Path, *args: str) -> Iterator[Guarded]:
    side = factory(*args, start=False)
    if "--token-file" in args:
        side.client.headers["Authorization"] = f"Bearer {TOKEN}"
    side.start()
    mark = tmp_path / "calls"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RANK": "0",
        "RANKSIDE_SOCKET": side.socket_path,
        "MARK": str(mark),
    }
    worker = subprocess.Popen([sys.executable, "-c", TOUCH_WORKER], env=env)
    try:
        side.wait_workers(1)
        yield Guarded(side, mark)
    finally:
        worker.kill()
        worker.wait()


@pytest.fixture
def open_node(sidecar_factory: SidecarFactory, tmp_path: Path) -> Iterator[Guarded]:
    """No token, loopback only: the default."""
    yield from start(sidecar_factory, tmp_path)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    return write_token_file(tmp_path, TOKEN)


def assert_json_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    message: str = response.json()["error"]
    return message


# -- DNS rebinding: the Host header ------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:{port}", "localhost.evil.example", "127.0.0.1.nip.io:{port}"],
)
def test_a_foreign_host_name_is_refused_without_a_token(open_node: Guarded, host: str) -> None:
    side = open_node.side
    for path in ("/api/v1/workers", "/api/v1/events", "/"):
        response = side.client.get(path, headers={"Host": host.format(port=side.port)})
        message = assert_json_error(response, 421)
        assert "without a token" in message
    response = side.client.post(
        "/api/v1/workers/0/handlers/touch", headers={"Host": host.format(port=side.port)}
    )
    assert_json_error(response, 421)
    assert open_node.calls() == 0


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:{port}",
        "127.0.0.1",
        "localhost:{port}",
        "LOCALHOST",
        "localhost:8080",  # kubectl port-forward 8080:9478
        "[::1]:{port}",
        "[::1]",
        "::1",
        "10.1.2.3:{port}",  # --insecure on 0.0.0.0, reached by the node's address
    ],
)
def test_loopback_names_and_addresses_are_served(open_node: Guarded, host: str) -> None:
    side = open_node.side
    response = side.client.get("/api/v1/workers", headers={"Host": host.format(port=side.port)})
    assert response.status_code == 200, response.text


def test_with_a_token_the_host_is_not_checked(
    sidecar_factory: SidecarFactory, tmp_path: Path, token_file: Path
) -> None:
    """Probes and scrapes use the pod address or a Service name; a rebound page has no token."""
    for node in start(sidecar_factory, tmp_path, "--token-file", str(token_file)):
        client = node.side.client
        assert client.get("/healthz", headers={"Host": "job-0.job.svc:9478"}).status_code == 200
        assert client.get("/metrics", headers={"Host": "job-0.job.svc:9478"}).status_code == 200
        anonymous = client.get(
            "/api/v1/workers", headers={"Host": "evil.example", "Authorization": ""}
        )
        assert anonymous.status_code == 401


# -- cross-site posts: Origin and Sec-Fetch-Site ---------------------------------------------


@pytest.mark.parametrize("path", HANDLER_POSTS)
@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": EVIL},
        {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"},
        {"Origin": "http://localhost:8888", "Sec-Fetch-Site": "same-site"},
        {"Origin": "null"},
        {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Content-Type": "text/plain", "Origin": EVIL},
    ],
)
def test_a_post_from_another_origin_is_refused_and_the_handler_not_called(
    open_node: Guarded, path: str, headers: dict[str, str]
) -> None:
    response = open_node.side.client.post(f"{path}?level=DEBUG", content=b"x", headers=headers)
    message = assert_json_error(response, 403)
    assert "--cors-origin" in message
    time.sleep(0.2)
    assert open_node.calls() == 0


def test_the_sidecars_own_page_and_the_cli_may_post(open_node: Guarded) -> None:
    side = open_node.side
    own = f"http://127.0.0.1:{side.port}"
    allowed = [
        {},  # curl, the rankside client
        {"Origin": own, "Sec-Fetch-Site": "same-origin"},
        {"Origin": own.upper()},
        # The page's no-referrer policy makes a browser send Origin: null even
        # to its own origin; Sec-Fetch-Site says it is one.
        {"Origin": "null", "Sec-Fetch-Site": "same-origin"},
        {"Origin": f"http://localhost:{side.port}", "Host": f"localhost:{side.port}"},
    ]
    for n, headers in enumerate(allowed, start=1):
        response = side.client.post("/api/v1/workers/0/handlers/touch", headers=headers)
        assert (response.status_code, response.text) == (200, "touched"), headers
        assert open_node.calls() == n
    # The same origin is the Host asked, not any port of the same name.
    other_port = {"Origin": f"http://127.0.0.1:{side.port + 1}"}
    assert side.client.post("/workers/0/handler/touch", headers=other_port).status_code == 403


def test_reads_stay_open_to_any_origin(open_node: Guarded) -> None:
    """GETs change nothing; CORS keeps another origin's page from reading the answer."""
    response = open_node.side.client.get("/api/v1/workers", headers={"Origin": EVIL})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_a_cors_origin_may_post(
    sidecar_factory: SidecarFactory, tmp_path: Path, token_file: Path
) -> None:
    args = ("--cors-origin", DASHBOARD, "--token-file", str(token_file))
    for node in start(sidecar_factory, tmp_path, *args):
        client = node.side.client
        cross = {"Origin": DASHBOARD, "Sec-Fetch-Site": "cross-site"}
        response = client.post("/api/v1/workers/0/handlers/touch", headers=cross)
        assert (response.status_code, response.text) == (200, "touched")
        assert response.headers["access-control-allow-origin"] == DASHBOARD
        evil = client.post("/api/v1/workers/0/handlers/touch", headers={"Origin": EVIL})
        assert_json_error(evil, 403)
        # Without the token the origin does not help.
        anonymous = client.post(
            "/api/v1/workers/0/handlers/touch", headers={**cross, "Authorization": ""}
        )
        assert anonymous.status_code == 401
        assert node.calls() == 1


def test_a_cors_origin_without_a_token(sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    for node in start(sidecar_factory, tmp_path, "--cors-origin", DASHBOARD + "/"):
        client = node.side.client
        ok = client.post("/workers/0/handler/touch", headers={"Origin": DASHBOARD})
        assert (ok.status_code, ok.text) == (200, "touched")
        assert client.post("/workers/0/handler/touch", headers={"Origin": EVIL}).status_code == 403
        # The Host check still holds: the dashboard names the sidecar by a loopback name.
        rebound = client.get("/api/v1/workers", headers={"Host": "dashboard.example"})
        assert rebound.status_code == 421


# -- a header that str.isdigit() took for a number ------------------------------------------


def raw_request(port: int, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


def test_non_ascii_digits_in_headers_are_not_a_500(open_node: Guarded) -> None:
    port = open_node.side.port
    stream = raw_request(
        port,
        b"GET /api/v1/events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Last-Event-ID: \xb2\r\nConnection: close\r\n\r\n",
    )
    assert stream.startswith(b"HTTP/1.1 200"), stream[:200]
    bad_port = raw_request(
        port, b"GET /api/v1/workers HTTP/1.1\r\nHost: 127.0.0.1:\xb2\r\nConnection: close\r\n\r\n"
    )
    assert bad_port.startswith(b"HTTP/1.1 421"), bad_port[:200]
    wait_for(lambda: open_node.side.client.get("/healthz").status_code == 200)
    assert "Traceback" not in open_node.side.log()


def test_a_non_ascii_content_length_is_not_taken_for_a_number() -> None:
    """The HTTP parsers refuse such a Content-Length before the app sees it; read_body
    must not rely on that."""
    import asyncio

    from starlette.requests import Request

    from sidecar.http.params import read_body

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"abc", "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-length", "\u00b2".encode("latin-1"))],
    }
    assert asyncio.run(read_body(Request(scope, receive), limit=10)) == b"abc"
