"""The HTTP client: bounds and deadlines of a sidecar's peer calls, the job-wide merges,
and job routes that never hold up the sidecar asking.

That the client imports nothing of the server is an import-linter contract
(pyproject.toml, ``make lint``)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from conftest import SidecarProcess

from sidecar.client.http import ClientError, Peers, Timeout
from sidecar.client.job import (
    CallPlan,
    JobWorkers,
    NodeStatus,
    fan_out,
    job_workers_async,
    merge_call,
    merge_workers,
    plan_call,
)
from sidecar.schema import FanOutSummary, Reply, summarize

# -- a sidecar's peers: bounded and on time ----------------------------------------------


async def answer_empty_listing(writer: asyncio.StreamWriter) -> None:
    """A sidecar's answer to GET /api/v1/workers with no workers, on a raw connection."""
    body = json.dumps({"time": 100.0, "workers": []}).encode()
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()


class SlowPeer:
    """An HTTP/1.1 server on the test's event loop that answers every request after
    ``delay`` seconds, counting the requests it holds at once."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.in_flight = 0
        self.peak = 0
        self.requests = 0
        self.connections = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                self.requests += 1
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
                await asyncio.sleep(self.delay)
                self.in_flight -= 1
                await answer_empty_listing(writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def test_peer_requests_are_bounded_and_connections_reused() -> None:
    async def main() -> tuple[SlowPeer, JobWorkers, float]:
        peer = SlowPeer(0.2)
        url = await peer.start()
        peers = Peers(None, timeout=5.0, max_parallel=3)
        try:
            # Ten "nodes" on one server: a path prefix makes each its own target.
            clients = [peers.client(f"{url}/node{i}") for i in range(10)]
            started = time.monotonic()
            view = await job_workers_async(clients)
            took = time.monotonic() - started
            # A second round reuses the kept-alive connections.
            await job_workers_async(clients)
        finally:
            await peers.aclose()
            peer.server.close()
        return peer, view, took

    peer, view, took = asyncio.run(main())
    assert all(node.ok for node in view.nodes) and len(view.nodes) == 10
    assert peer.peak == 3
    assert peer.requests == 20 and peer.connections <= 3
    # Four rounds of at most three: 0.8 s, not the 2 s of one at a time.
    assert 0.75 < took < 1.9


class ClosingPeer(SlowPeer):
    """A peer whose keep-alive expiry closes an idle connection just as a request comes.

    uvicorn (the sidecar's server) closes a connection idle for its
    ``timeout_keep_alive`` (5 s); a request sent on it at about that moment
    meets a connection that closes without an answer. Here a connection idle
    for ``idle_limit`` seconds gets exactly that, every time.
    """

    def __init__(self, idle_limit: float) -> None:
        super().__init__(0.0)
        self.idle_limit = idle_limit

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        idle_since = time.monotonic()
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                if time.monotonic() - idle_since >= self.idle_limit and self.requests:
                    return
                self.requests += 1
                await answer_empty_listing(writer)
                idle_since = time.monotonic()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def test_a_connection_idle_for_most_of_the_servers_keep_alive_is_not_reused() -> None:
    # Captures come rarely (a stall), so the kept-alive connection to each
    # node is usually idle: reusing one as the node closes it would list the
    # node as not answering ("Server disconnected without sending a response").
    async def main() -> tuple[ClosingPeer, Any]:
        peer = ClosingPeer(idle_limit=3.0)
        url = await peer.start()
        peers = Peers(None, timeout=5.0)
        try:
            await peers.client(url).get_json("/api/v1/workers")
            await asyncio.sleep(3.2)
            second: Any = await peers.client(url).get_json("/api/v1/workers")
        except ClientError as exc:
            second = exc
        finally:
            await peers.aclose()
            peer.server.close()
        return peer, second

    peer, second = asyncio.run(main())
    assert second == {"time": 100.0, "workers": []}
    assert peer.requests == 2 and peer.connections == 2


def test_a_peer_that_trickles_its_answer_gets_one_deadline_in_all() -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        # Never a pause long enough for a read timeout; never an end either.
        with_header = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000
        try:
            for byte in with_header:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)
        except ConnectionError:
            pass

    async def main() -> tuple[BaseException | Any, float]:
        server = await asyncio.start_server(trickle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        peers = Peers(None, timeout=0.5)
        started = time.monotonic()
        try:
            result: BaseException | Any = await peers.client(url).get_json("/api/v1/workers")
        except ClientError as exc:
            result = exc
        finally:
            took = time.monotonic() - started
            await peers.aclose()
            server.close()
        return result, took

    result, took = asyncio.run(main())
    assert isinstance(result, Timeout)
    assert "within 0.5 s" in str(result)
    assert took < 1.5


class SilentPeer:
    """Accepts connections and never answers (a node whose sidecar hangs)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent_peer() -> Iterator[SilentPeer]:
    peer = SilentPeer()
    yield peer
    peer.close()


def test_a_peer_that_never_answers_does_not_hold_up_the_sidecar(
    sidecar_factory: Callable[..., SidecarProcess], silent_peer: SilentPeer
) -> None:
    side = sidecar_factory("--target", silent_peer.url, "--target", silent_peer.url + "/b")
    answers: list[httpx.Response] = []

    def ask() -> None:
        answers.append(side.client.get("/api/v1/job/workers"))

    askers = [threading.Thread(target=ask) for _ in range(3)]
    started = time.monotonic()
    for asker in askers:
        asker.start()
    deadline = time.monotonic() + 5
    while len(silent_peer.accepted) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(silent_peer.accepted) >= 2, "the job routes never asked the peer"
    # Meanwhile the sidecar answers everything else at once.
    for _ in range(5):
        before = time.monotonic()
        assert side.client.get("/healthz").text == "ok"
        assert side.client.get("/api/v1/workers").status_code == 200
        assert time.monotonic() - before < 0.5
    for asker in askers:
        asker.join(30)
    took = time.monotonic() - started
    assert len(answers) == 3
    for response in answers:
        assert response.status_code == 200
        nodes = response.json()["nodes"]
        assert [n["ok"] for n in nodes] == [False, False]
        assert "no answer from" in nodes[0]["error"] and "within 5 s" in nodes[0]["error"]
    # Every request waited for the one node timeout, in parallel, not one after another.
    assert took < 9


# -- job-wide merges ----------------------------------------------------------------------


def fan_out_reply(replies: dict[str, Reply]) -> Reply:
    body = {
        "handler": "ping",
        "summary": summarize(replies),
        "ranks": {key: reply.to_json() for key, reply in replies.items()},
    }
    return Reply(200, "application/json", json.dumps(body).encode())


def test_a_job_call_sums_the_nodes_summaries_and_keeps_job_facts_beside_them() -> None:
    a, b, down = "http://a:9478", "http://b:9478", "http://c:9478"
    listing = merge_workers(
        [a, b, down],
        [
            {"time": 1.0, "workers": [{"key": "0", "rank": 0, "state": "running"},
                                      {"key": "1", "rank": 1, "state": "running"}]},
            {"time": 1.0, "workers": [{"key": "3", "rank": 3, "state": "running"}]},
            ClientError("cannot reach http://c:9478: [Errno 111] Connection refused"),
        ],
    )  # fmt: skip
    plan = plan_call([a, b, down], [0, 1, 3, 9], listing)
    assert plan.asks == [(a, "0,1"), (b, "3")] and plan.missing == [9]
    ok = Reply(200, "text/plain", b"pong")
    timed_out = Reply(408, "text/plain", b"Timeout: no reply", answered=False)
    result = merge_call(
        "ping",
        plan,
        fan_out("ping", [], 2.0),
        [fan_out_reply({"0": ok, "1": timed_out}), fan_out_reply({"3": ok})],
    )
    expected: FanOutSummary = {
        "workers": 3,
        "answered": 2,
        "ok": 2,
        "timed_out": 1,
        "unavailable": 0,
        "text": "PARTIAL DATA: 2/3 workers responded\n  Rank 1: Timeout: no reply",
    }
    assert result.summary == expected
    data = result.to_json()
    assert set(data["summary"]) == set(summarize({}))
    assert data["missing"] == [9] and data["unreachable_nodes"] == 1
    assert list(data["ranks"]) == ["0", "1", "3"]
    assert data["ranks"]["3"]["node"] == b
    assert [(n["url"], n["ok"], n["workers"]) for n in data["nodes"]] == [
        (a, True, 2),
        (b, True, 1),
        (down, False, 0),
    ]


def test_answers_that_are_not_a_sidecars_make_the_node_unreachable() -> None:
    plan = CallPlan([("http://a", None)], [NodeStatus("http://a", ok=True)], [])
    bad = Reply(200, "application/json", b'{"ranks": {}}')
    result = merge_call("ping", plan, fan_out("ping", [], None), [bad])
    assert result.unreachable[0].error == (
        "http://a/api/v1/handlers/ping did not answer a fan-out: is it a sidecar?"
    )
    view = merge_workers(["http://a"], [{"workers": "many"}])
    assert "did not answer a worker list" in str(view.nodes[0].error)
