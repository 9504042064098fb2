"""The HTTP API against its contract and against hostile input.

Schemathesis generates requests from ``/openapi.json`` and checks every answer
against it (no 5xx, documented statuses and content types, the error
schema); then oversize bodies and heads, and injection attempts in every path
parameter and query parameter of every route. A real sidecar process with a
real worker answers all of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from node import Node

from sidecar.http.limits import MAX_HEAD

SCHEMATHESIS_CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node = Node(tmp_path_factory.mktemp("contract"), "--max-body", "4096")
    node.start()
    node.spawn("control_worker.py", rank=0)
    node.sidecar.wait_workers(1)
    yield node
    node.close()


@pytest.fixture
def client(node: Node) -> httpx.Client:
    return node.sidecar.client


def test_schemathesis_finds_no_server_error_or_contract_violation(
    node: Node, tmp_path: Path
) -> None:
    schemathesis = Path(sys.executable).with_name("schemathesis")
    if not schemathesis.exists():
        pytest.fail("schemathesis is not installed: pip install -e '.[test]'")
    result = subprocess.run(
        [
            str(schemathesis), "--config-file", str(SCHEMATHESIS_CONFIG),
            "run", f"{node.sidecar.url}/openapi.json",
            "--max-examples", "25",
            "--seed", "8",
            "--generation-database", "none",
            "--workers", "1",
            "--request-timeout", "20",
            # An event stream never ends; test_event_stream_contract covers it.
            "--exclude-path", "/api/v1/events/stream",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip
    # The failures section first (a failing case's body can be long), then the end.
    failures = result.stdout[result.stdout.find("FAILURES") :][:1500]
    assert result.returncode == 0, failures + result.stdout[-6000:] + result.stderr[-2000:]
    assert node.sidecar.proc is not None and node.sidecar.proc.poll() is None


def test_event_stream_contract(client: httpx.Client) -> None:
    # The same rule as /api/v1/events: -1 once slipped through, meaning "no backlog".
    for bad in ("x", "-1", "-5", " 1", "+3", "1_0"):
        response = client.get("/api/v1/events/stream", params={"since": bad})
        assert response.status_code == 400, bad
        assert "since" in response.json()["error"]
    with client.stream("GET", "/api/v1/events/stream?since=0") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        first = next(response.iter_lines())
        assert first.startswith(("id: ", ": keep-alive"))


def test_405_says_what_is_allowed(client: httpx.Client) -> None:
    response = client.delete("/api/v1/workers")
    assert response.status_code == 405
    assert "GET" in response.headers["allow"]
    assert "error" in response.json()


# -- oversize bodies and heads ------------------------------------------------------------------


def test_oversize_body_is_refused_with_or_without_a_length(client: httpx.Client) -> None:
    for url in ("/api/v1/workers/0/handlers/echo", "/api/v1/handlers/echo"):
        declared = client.post(url, content=b"x" * 4097)
        assert declared.status_code == 413, url

        def chunks() -> Iterator[bytes]:
            for _ in range(100):
                yield b"y" * 1000

        streamed = client.post(url, content=chunks())  # chunked: no Content-Length
        assert streamed.status_code == 413, url
        assert "4096 byte limit" in streamed.json()["error"]
        assert client.post(url, content=b"z" * 4096).status_code == 200


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # Refused mid-send: the answer is already waiting to be read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
        return answer


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 * MAX_HEAD) + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: a\r\n" % i for i in range(20_000))
        + b"\r\n",
        b"GET /healthz?" + b"a" * (8 * MAX_HEAD) + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["one-long-header", "many-headers", "long-url"],
)
def test_oversize_head_is_refused_before_it_is_buffered(node: Node, head: bytes) -> None:
    answer = raw_request(node.sidecar.port, head)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"byte limit" in answer
    assert node.sidecar.client.get("/healthz").text == "ok"


def test_a_head_just_under_the_limit_and_a_body_in_the_same_read(node: Node) -> None:
    filler = b"a" * (MAX_HEAD - 200)
    body = b"b" * 3000
    request = (
        b"POST /api/v1/workers/0/handlers/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"X-Fill: " + filler + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    answer = raw_request(node.sidecar.port, request + body)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert answer.endswith(body)
    # Keep-alive: a second request on the same connection has a head of its own.
    with httpx.Client(base_url=node.sidecar.url) as keep_alive:
        for _ in range(3):
            assert keep_alive.get("/healthz", headers={"X-Fill": "a" * 30_000}).text == "ok"


# -- injection in every path and query parameter ---------------------------------------------------

NASTY = [
    "../../../../etc/passwd",
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "0/../../static/app.js",
    "0\x00",
    "0%00",
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "' OR '1'='1",
    "$(touch /tmp/rankside-pwned)",
    "`id`",
    "; ls -la",
    "0\r\nX-Injected: 1",
    "{rank}",
    "%s%s%s%n",
    "9" * 400,
    "-1",
    "\u202e\u0000\ufeff",
    "a" * 5000,
]


def routes(client: httpx.Client) -> list[tuple[str, str, list[str], list[str]]]:
    paths = client.get("/openapi.json").json()["paths"]
    found = []
    for path, operations in paths.items():
        for method, operation in operations.items():
            params = operation.get("parameters", [])
            found.append(
                (
                    method,
                    path,
                    [p["name"] for p in params if p["in"] == "path"],
                    [p["name"] for p in params if p["in"] == "query"],
                )
            )
    return found


def check_answer(response: httpx.Response, what: str) -> None:
    assert response.status_code < 500 or response.status_code == 504, (what, response.text[:300])
    assert b"root:x:0:0" not in response.content, what
    assert "x-injected" not in response.headers, what
    content_type = response.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        json.loads(response.content)
    if content_type.startswith("text/html"):
        assert b"<script>alert(1)" not in response.content, what
        assert b"<img src=x" not in response.content, what


def test_injection_in_every_path_parameter(client: httpx.Client) -> None:
    checked = 0
    for method, path, path_params, _ in routes(client):
        if path == "/api/v1/events/stream":
            continue
        for name in path_params:
            for value in NASTY:
                url = path
                for other in path_params:
                    url = url.replace(
                        "{" + other + "}", quote(value, safe="") if other == name else "0"
                    )
                response = client.request(method, url + "?timeout=2")
                check_answer(response, f"{method} {url}")
                checked += 1
    assert checked > 200
    assert not Path("/tmp/rankside-pwned").exists()


def test_injection_in_every_query_parameter(client: httpx.Client) -> None:
    checked = 0
    for method, path, path_params, query_params in routes(client):
        if path == "/api/v1/events/stream":
            continue  # a valid ?since= opens a stream that never ends; see above
        url = path
        for name in path_params:
            url = url.replace("{" + name + "}", "ping" if name == "name" else "0")
        for name in [*query_params, "timeout", "ranks", "since", "limit"]:
            for value in NASTY:
                response = client.request(method, url, params={name: value})
                check_answer(response, f"{method} {url}?{name}={value[:40]!r}")
                checked += 1
    assert checked > 200
    assert not Path("/tmp/rankside-pwned").exists()


def test_static_files_do_not_traverse(client: httpx.Client) -> None:
    for attempt in (
        "/static/..%2F..%2Fsidecar%2Fauth.py",
        "/static/%2e%2e/%2e%2e/pyproject.toml",
        "/static/../../pyproject.toml",
        "/static/..%5C..%5Cpyproject.toml",
        "/static/.%2F..%2Fpage.py",
    ):
        response = client.get(attempt)
        assert response.status_code == 404, attempt
        assert b"[project]" not in response.content and b"import " not in response.content
