"""The control plane end to end: built-in handlers, relays, fan-out and deadlines.

One sidecar and three workers serve the whole module: ranks 0 and 1 answer
``hang`` at once, rank 2 hangs in it for a minute.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from conftest import wait_for
from node import Node
from starlette.routing import BaseRoute, Mount, Route

from sidecar.config import Config
from sidecar.http.app import create_app
from sidecar.http.openapi import PATHS
from sidecar.node.relay import CallTimeout, PendingCalls
from sidecar.node.service import Sidecar
from sidecar.node.socket_server import bind_unix_socket
from sidecar.schema import MAX_RANKS, Reply, parse_ranks

BUILTINS = {"ping", "dump_traceback", "pyspy_dump", "set_log_level", "gc", "memory", "threads"}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node = Node(tmp_path_factory.mktemp("control")).start()
    node.spawn("control_worker.py", rank=0)
    node.spawn("control_worker.py", rank=1, env={"RANKSIDE_PYSPY": "/nonexistent/py-spy"})
    node.spawn("control_worker.py", rank=2, env={"HANG": "1"})
    node.sidecar.wait_workers(3)
    yield node
    node.close()


@pytest.fixture
def client(node: Node) -> httpx.Client:
    return node.sidecar.client


def call(client: httpx.Client, rank: int, name: str, **params: str) -> httpx.Response:
    return client.post(f"/api/v1/workers/{rank}/handlers/{name}", params=params)


# -- handler lists ------------------------------------------------------------------


def test_worker_handler_list(client: httpx.Client) -> None:
    response = client.get("/api/v1/workers/0/handlers")
    assert response.status_code == 200
    assert response.json()["worker"] == "0"
    assert BUILTINS | {"py_profile", "hang", "echo"} <= set(response.json()["handlers"])
    assert client.get("/api/v1/workers/99/handlers").status_code == 404


def test_handler_registered_after_connect_is_listed_within_a_second(
    client: httpx.Client,
) -> None:
    assert "late" not in client.get("/api/v1/workers/1/handlers").json()["handlers"]
    registered_at = float(call(client, 1, "register_late").text)
    wait_for(
        lambda: "late" in client.get("/api/v1/workers/1/handlers").json()["handlers"],
        timeout=5,
        interval=0.01,
        what="the late handler in the list",
    )
    assert time.time() - registered_at < 1.0
    assert call(client, 1, "late").text == "late and here"


# -- built-in handlers through the relay -------------------------------------------


def test_ping(client: httpx.Client) -> None:
    response = call(client, 0, "ping")
    assert (response.status_code, response.text) == (200, "pong")
    assert response.headers["content-type"].startswith("text/plain")


def test_dump_traceback_shows_every_thread_as_faulthandler_does(client: httpx.Client) -> None:
    # The handler threads start with the first call one runs (dump_traceback
    # runs on the connection thread).
    assert call(client, 0, "hang").text == "not hung"
    response = call(client, 0, "dump_traceback")
    assert response.status_code == 200
    text = response.text
    assert text.startswith(("Current thread 0x", "Thread 0x"))
    assert "line " in text and " in training_loop\n" in text
    # The main thread, the connection thread (current) and four handler threads.
    assert text.count("Thread 0x") + text.count("Current thread 0x") >= 6
    assert text.count("in _run\n") >= 5


def test_threads(client: httpx.Client) -> None:
    threads = call(client, 0, "threads").json()["threads"]
    main = [t for t in threads if t["main"]]
    assert len(main) == 1 and main[0]["name"] == "MainThread" and not main[0]["daemon"]
    names = {t["name"] for t in threads}
    assert "rankside-connection" in names
    assert all(isinstance(t["ident"], int) for t in threads)


def test_gc_counts_before_and_after(client: httpx.Client) -> None:
    result = call(client, 0, "gc", generation="1").json()
    assert result["generation"] == 1
    assert result["collected"] >= 0
    assert set(result["before"]) == set(result["after"]) == {"counts", "objects"}


def test_memory(client: httpx.Client) -> None:
    result = call(client, 0, "memory").json()
    assert result["rss_bytes"] > 1024 * 1024
    assert result["peak_rss_bytes"] >= result["rss_bytes"]
    assert result["tracemalloc"] is None  # only when the worker traces allocations


def test_set_log_level(client: httpx.Client) -> None:
    result = call(client, 0, "set_log_level", logger="train.data", level="debug").json()
    assert result == {
        "logger": "train.data",
        "existed": False,
        "previous": "NOTSET",
        "level": "DEBUG",
        "effective": "DEBUG",
    }
    again = call(client, 0, "set_log_level", logger="train.data", level="WARNING").json()
    assert (again["existed"], again["previous"], again["level"]) == (True, "DEBUG", "WARNING")


def test_py_profile_text_and_collapsed(client: httpx.Client) -> None:
    text = call(client, 0, "py_profile", duration="0.3").text
    assert re.match(r"\d+ samples every 5 ms over 0.3 s", text)
    assert "MainThread" in text and "training_loop" in text
    assert "rankside-connection" not in text
    folded = call(client, 0, "py_profile", duration="0.2", interval="0.01", format="collapsed")
    lines = folded.text.splitlines()
    assert lines, "no samples"
    for line in lines:
        stack, count = line.rsplit(" ", 1)
        assert int(count) > 0 and stack.split(";")[0]
    assert any(line.startswith("MainThread;") and "training_loop" in line for line in lines)


def test_pyspy_dump_answers_honestly(client: httpx.Client, node: Node) -> None:
    response = call(client, 0, "pyspy_dump", native="0")
    if response.status_code == 200:
        assert f"Process {node.workers[0].pid}" in response.text
        assert "training_loop" in response.text
    else:  # a kernel or container that forbids ptrace: the error must say so
        assert response.status_code == 500
        assert "ptrace" in response.text, response.text


def test_pyspy_dump_without_pyspy_says_how_to_get_it(client: httpx.Client) -> None:
    response = call(client, 1, "pyspy_dump")
    assert response.status_code == 500
    assert "py-spy is not installed" in response.text and "RANKSIDE_PYSPY" in response.text


@pytest.mark.parametrize(
    ("name", "params", "named"),
    [
        ("pyspy_dump", {"native": "maybe"}, "native"),
        ("pyspy_dump", {"subprocesses": "2"}, "subprocesses"),
        ("pyspy_dump", {"pid": "1"}, "pid"),
        ("dump_traceback", {"all": "1"}, "all"),
        ("set_log_level", {"level": "loud"}, "level"),
        ("set_log_level", {"logger": "x"}, "level"),
        ("gc", {"generation": "3"}, "generation"),
        ("memory", {"top": "0"}, "top"),
        ("memory", {"group": "traceback"}, "group"),
        ("threads", {"verbose": "1"}, "verbose"),
        ("py_profile", {"duration": "0"}, "duration"),
        ("py_profile", {"duration": "abc"}, "duration"),
        ("py_profile", {"duration": "1", "format": "svg"}, "format"),
        ("py_profile", {"interval": "-1"}, "interval"),
    ],
)
def test_bad_parameter_is_a_400_naming_it(
    client: httpx.Client, name: str, params: dict[str, str], named: str
) -> None:
    response = call(client, 0, name, **params)
    assert response.status_code == 400
    assert f"'{named}'" in response.text


def test_raising_handler_is_a_500_as_in_torch(client: httpx.Client) -> None:
    response = call(client, 0, "boom")
    assert (response.status_code, response.text) == (500, "Handler boom failed: ValueError: kaboom")


def test_unknown_handler_is_a_404_as_in_torch(client: httpx.Client) -> None:
    response = call(client, 0, "nonexistant")
    assert response.status_code == 404
    assert response.text == "Handler nonexistant not found: Failed to find handler nonexistant"


def test_binary_body_round_trip(client: httpx.Client) -> None:
    payload = bytes(range(256)) * 4
    response = client.post("/api/v1/workers/0/handlers/echo", content=payload)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.content == payload


# -- deadlines -------------------------------------------------------------------------


def test_deadline_is_a_504_and_the_late_reply_is_dropped(client: httpx.Client) -> None:
    start = time.monotonic()
    response = call(client, 2, "hang", timeout="0.3")
    assert response.status_code == 504
    assert time.monotonic() - start < 2
    # The worker is still busy in the first call; the relay keeps serving it.
    assert call(client, 2, "ping").text == "pong"


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "abc", "301"])
def test_timeout_outside_the_allowed_range_is_a_400(client: httpx.Client, timeout: str) -> None:
    response = call(client, 0, "ping", timeout=timeout)
    assert response.status_code == 400
    assert "timeout" in response.json()["error"]


def test_request_body_over_the_limit_is_a_413(client: httpx.Client) -> None:
    response = client.post("/api/v1/workers/0/handlers/echo", content=b"x" * (1024 * 1024 + 1))
    assert response.status_code == 413
    response = client.post("/api/v1/handlers/echo", content=b"x" * (1024 * 1024 + 1))
    assert response.status_code == 413


# -- fan-out ---------------------------------------------------------------------------


def fan_out(client: httpx.Client, name: str, **params: str) -> httpx.Response:
    return client.post(f"/api/v1/handlers/{name}", params=params)


def test_fan_out_to_every_worker(client: httpx.Client) -> None:
    result = fan_out(client, "ping").json()
    assert result["handler"] == "ping"
    assert set(result["ranks"]) == {"0", "1", "2"}
    for answer in result["ranks"].values():
        assert answer == {
            "status": 200,
            "content_type": "text/plain",
            "encoding": "utf-8",
            "body": "pong",
        }
    assert result["summary"] == {
        "workers": 3,
        "answered": 3,
        "ok": 3,
        "timed_out": 0,
        "unavailable": 0,
        "text": None,
    }


def test_fan_out_with_a_hung_worker_returns_the_others_within_the_timeout(
    client: httpx.Client,
) -> None:
    start = time.monotonic()
    result = fan_out(client, "hang", timeout="1").json()
    elapsed = time.monotonic() - start
    assert elapsed < 1.8, elapsed
    assert result["ranks"]["0"]["status"] == result["ranks"]["1"]["status"] == 200
    assert result["ranks"]["0"]["body"] == "not hung"
    assert result["ranks"]["2"]["status"] == 408
    assert result["ranks"]["2"]["body"].startswith("Timeout")
    summary = result["summary"]
    assert (summary["answered"], summary["ok"], summary["timed_out"]) == (2, 2, 1)
    assert summary["text"].startswith("PARTIAL DATA: 2/3 workers responded")


def test_fan_out_rank_selection_and_missing_ranks(client: httpx.Client) -> None:
    result = fan_out(client, "ping", ranks="0,1,5-6").json()
    assert list(result["ranks"]) == ["0", "1", "5", "6"]
    assert result["ranks"]["5"]["status"] == 503
    assert (result["summary"]["ok"], result["summary"]["unavailable"]) == (2, 2)


def test_fan_out_passes_parameters_and_reports_each_status(client: httpx.Client) -> None:
    result = fan_out(client, "gc", ranks="0-1", generation="7").json()
    for answer in result["ranks"].values():
        assert answer["status"] == 400 and "'generation'" in answer["body"]
    assert result["summary"]["answered"] == 2 and result["summary"]["ok"] == 0


def test_fan_out_binary_bodies_are_base64(client: httpx.Client) -> None:
    result = fan_out(client, "binary", ranks="0,1").json()
    for answer in result["ranks"].values():
        assert answer["encoding"] == "base64"
        assert base64.b64decode(answer["body"]) == bytes(range(256))
    payload = b"\x00\x80\xff rankside"
    result = client.post("/api/v1/handlers/echo?ranks=1", content=payload).json()
    assert base64.b64decode(result["ranks"]["1"]["body"]) == payload


@pytest.mark.parametrize("spec", ["", "a", "1-", "3-1", "1,,2", "-1", f"0-{MAX_RANKS}"])
def test_fan_out_bad_rank_spec_is_a_400(client: httpx.Client, spec: str) -> None:
    response = fan_out(client, "ping", ranks=spec)
    assert response.status_code == 400
    assert "ranks" in response.json()["error"]


def test_parse_ranks() -> None:
    assert parse_ranks("0,2-5") == [0, 2, 3, 4, 5]
    assert parse_ranks(" 3 , 1,1-2") == [1, 2, 3]
    assert parse_ranks("7") == [7]


# -- OpenAPI ---------------------------------------------------------------------------


def walk_routes(routes: Sequence[BaseRoute], prefix: str = "") -> Iterator[tuple[str, Route]]:
    """Every Route with its full path, mounts included; anything else fails the test."""
    for route in routes:
        if isinstance(route, Mount):
            yield from walk_routes(route.routes, prefix + route.path)
        else:
            assert isinstance(route, Route), f"describe {type(route).__name__} routes too"
            yield prefix + route.path, route


def test_openapi_describes_every_route_and_nothing_else(tmp_path: Path) -> None:
    config = Config(socket_path=str(tmp_path / "s.sock"))
    listener = bind_unix_socket(config.socket_path, config.socket_mode)
    try:
        app = create_app(Sidecar(config, listener))
    finally:
        listener.close()
    served = {
        (path, method.lower())
        for path, route in walk_routes(app.routes)
        for method in route.methods or ()
        if method != "HEAD"
    }
    documented = {(path, method) for path, ops in PATHS.items() for method in ops}
    assert served == documented


def test_openapi_is_served(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    assert "/api/v1/handlers/{name}" in document["paths"]
    json.dumps(document)


def test_a_late_reply_finds_nothing_to_resolve() -> None:
    """After a deadline nothing is kept for the call, and its reply is simply dropped."""

    async def scenario() -> None:
        pending = PendingCalls()
        call_id, future = pending.open()
        with pytest.raises(CallTimeout):
            await pending.wait(call_id, future, 0.01)
        assert len(pending) == 0
        assert not pending.resolve(call_id, Reply(200, "text/plain", b"late"))
        assert len(pending) == 0

    asyncio.run(scenario())
