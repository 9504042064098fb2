"""Access control: bearer token, open probes, loopback-only without a token, CORS, 413."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, SidecarProcess, free_port, write_token_file
from node import Node

from sidecar.values import is_loopback

TOKEN = "s3cret-token-for-tests"
DASHBOARD = "http://dashboard.example"

SidecarFactory = Callable[..., SidecarProcess]


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_file(tmp_path_factory.mktemp("token"), TOKEN)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, token_file: Path) -> Iterator[Node]:
    """A sidecar with a token and CORS for one origin, and one worker."""
    node = Node(
        tmp_path_factory.mktemp("guarded"),
        "--token-file", str(token_file),
        "--cors-origin", DASHBOARD,
        "--max-body", "1000",
    )  # fmt: skip
    node.start()
    node.spawn("control_worker.py", rank=0)
    client = node.sidecar.client
    client.headers.update(bearer())
    node.sidecar.wait_workers(1)
    del client.headers["Authorization"]
    yield node
    node.close()


@pytest.fixture
def client(guarded: Node) -> httpx.Client:
    return guarded.sidecar.client


PROTECTED = [
    ("GET", "/openapi.json"),
    ("GET", "/api/v1/workers"),
    ("GET", "/api/v1/workers/0"),
    ("GET", "/api/v1/workers/0/handlers"),
    ("POST", "/api/v1/workers/0/handlers/ping"),
    ("POST", "/api/v1/handlers/ping"),
    ("GET", "/workers/0/"),
    ("GET", "/workers/0/handler/"),
    ("POST", "/workers/0/handler/ping"),
    ("GET", "/api/v1/events"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_api_needs_the_token(client: httpx.Client, method: str, path: str) -> None:
    response = client.request(method, path)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="rankside"'
    wrong = client.request(method, path, headers=bearer("not-the-token"))
    assert wrong.status_code == 401
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    basic = client.request(method, path, headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401
    assert client.request(method, path, headers=bearer()).status_code == 200


def test_handler_call_with_the_token(client: httpx.Client) -> None:
    response = client.post("/workers/0/handler/ping", headers=bearer())
    assert (response.status_code, response.text) == (200, "pong")


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
def test_probes_and_metrics_stay_open(client: httpx.Client, path: str) -> None:
    assert client.get(path).status_code == 200


def test_body_limit_is_configurable(client: httpx.Client) -> None:
    ok = client.post("/api/v1/workers/0/handlers/echo", content=b"x" * 1000, headers=bearer())
    assert ok.status_code == 200
    big = client.post("/api/v1/workers/0/handlers/echo", content=b"x" * 1001, headers=bearer())
    assert big.status_code == 413
    assert "1000 byte limit" in big.json()["error"]


def test_cors_for_the_configured_origin(client: httpx.Client) -> None:
    response = client.get("/api/v1/workers", headers={"Origin": DASHBOARD, **bearer()})
    assert response.headers["access-control-allow-origin"] == DASHBOARD
    # A preflight carries no token and must not be refused for that.
    preflight = client.options(
        "/api/v1/handlers/ping",
        headers={
            "Origin": DASHBOARD,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == DASHBOARD
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    # A 401 still tells the browser page what went wrong.
    refused = client.get("/api/v1/workers", headers={"Origin": DASHBOARD})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == DASHBOARD
    other = client.get("/api/v1/workers", headers={"Origin": "http://evil.example", **bearer()})
    assert "access-control-allow-origin" not in other.headers


def test_no_cors_unless_configured(sidecar: SidecarProcess) -> None:
    response = sidecar.client.get("/api/v1/workers", headers={"Origin": DASHBOARD})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_metrics_auth_closes_the_probes_too(
    sidecar_factory: SidecarFactory, token_file: Path
) -> None:
    side = sidecar_factory("--token-file", str(token_file), "--metrics-auth", start=False)
    side.client.headers.update(bearer())
    side.start()
    for path in ("/metrics", "/healthz", "/readyz"):
        assert side.client.get(path).status_code == 200
        assert side.client.get(path, headers={"Authorization": ""}).status_code == 401


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``rankside serve`` expecting it to refuse to start."""
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=env,
    )


def test_non_loopback_without_token_is_refused(tmp_path: Path) -> None:
    result = serve("--socket", str(tmp_path / "s.sock"), "--listen", f"0.0.0.0:{free_port()}")
    assert result.returncode != 0
    assert "refusing to listen on 0.0.0.0" in result.stderr
    assert "--token-file" in result.stderr and "--insecure" in result.stderr


def test_non_loopback_with_insecure_starts(sidecar_factory: SidecarFactory) -> None:
    # The fixture's --listen comes first; the later one wins.
    side = sidecar_factory("--listen", "0.0.0.0:0", "--insecure", start=False)
    side.args[-2] = f"0.0.0.0:{side.port}"
    side.start()
    assert side.client.get("/api/v1/workers").status_code == 200


def test_non_loopback_with_token_from_the_environment_starts(
    sidecar_factory: SidecarFactory, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANKSIDE_TOKEN_FILE", str(token_file))
    side = sidecar_factory("--listen", "0.0.0.0:0", start=False)
    side.args[-1] = f"0.0.0.0:{side.port}"
    side.client.headers.update(bearer())
    side.start()
    assert side.client.get("/api/v1/workers").status_code == 200
    assert side.client.get("/api/v1/workers", headers={"Authorization": ""}).status_code == 401


@pytest.mark.parametrize("content", ["", "  \n"])
def test_empty_token_file_is_refused(tmp_path: Path, content: str) -> None:
    token = tmp_path / "token"
    token.write_text(content)
    result = serve("--socket", str(tmp_path / "s.sock"), "--token-file", str(token))
    assert result.returncode != 0
    assert "is empty" in result.stderr


@pytest.mark.parametrize("content", ["first\nsecond\n", "key value\n", "tok\ten"])
def test_a_token_file_of_two_lines_or_words_is_refused_by_name(
    tmp_path: Path, content: str
) -> None:
    """No Authorization header can carry such a token: the sidecar would refuse every request."""
    token = tmp_path / "token"
    token.write_text(content)
    token.chmod(0o600)
    result = serve("--socket", str(tmp_path / "s.sock"), "--token-file", str(token))
    assert result.returncode == 1, result.stderr
    assert f"the token file {token} holds more than one line" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "s.sock").exists()


def test_missing_token_file_is_refused(tmp_path: Path) -> None:
    result = serve("--socket", str(tmp_path / "s.sock"), "--token-file", str(tmp_path / "none"))
    assert result.returncode != 0
    assert "cannot read the token file" in result.stderr


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("node-7.cluster", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
