"""A worker's way out, and its connection's handshake, against fake sidecars.

The fake sidecars here are plain unix socket servers, so they can do what the
real one never does: stop reading, or hang up in the middle of a call.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import WorkerProcess, wait_for
from wire import RawPeer

from worker_hooks import protocol


class AcceptedPeer(RawPeer):
    """The sidecar's end of a worker's connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)

    def welcome(self, key: str = "0") -> None:
        self.send({"type": "welcome", "version": protocol.PROTOCOL_VERSION, "key": key})


class FakeSidecar:
    def __init__(self, path: str) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen()
        self.server.settimeout(10)
        self.peers: list[AcceptedPeer] = []

    def accept(self) -> AcceptedPeer:
        peer = AcceptedPeer(self.server.accept()[0])
        self.peers.append(peer)
        return peer

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        self.server.close()


@pytest.fixture
def fake_sidecar(tmp_path: Path) -> Iterator[FakeSidecar]:
    fake = FakeSidecar(str(tmp_path / "rankside.sock"))
    yield fake
    fake.close()


# A worker that makes SERIES label sets of a counter and then leaves its
# ``worker_main()``. "late": just before leaving, so the final flush is the
# big one; "early": long before, so the connection thread is stuck sending it.
EXIT_WORKER = """
import sys
import time

import worker_hooks
from worker_hooks import metrics

series, when = int(sys.argv[1]), sys.argv[2]
items = metrics.counter("items_total", "Items seen.", ["item"])


def make_series():
    for i in range(series):
        items.labels(item=f"{i:08d}-" + "x" * 64).inc()


with worker_hooks.worker_main():
    connection = worker_hooks.current_connection()
    if connection is not None and connection.wait_connected(10):
        print("connected", flush=True)
    if when == "early":
        make_series()
        time.sleep(1.0)
    else:
        time.sleep(0.3)
        make_series()
    leaving = time.monotonic()
print(f"closed in {time.monotonic() - leaving:.3f} s", flush=True)
"""


def closed_in(worker: WorkerProcess) -> float:
    assert worker.proc.wait(10) == 0, worker.log()
    found = re.search(r"closed in ([0-9.]+) s", worker.log())
    assert found, worker.log()
    return float(found.group(1))


@pytest.mark.parametrize("when", ["late", "early"])
def test_exit_is_bounded_when_the_sidecar_stops_reading(
    fake_sidecar: FakeSidecar, spawn_worker: Callable[..., WorkerProcess], tmp_path: Path, when: str
) -> None:
    script = tmp_path / "exit_worker.py"
    script.write_text(EXIT_WORKER)
    flush = "60" if when == "late" else "0.1"
    worker = spawn_worker(
        str(script), "10000", when, rank=0, env={"RANKSIDE_FLUSH_INTERVAL": flush}
    )
    peer = fake_sidecar.accept()
    peer.welcome()  # and never read a byte
    wait_for(lambda: "connected" in worker.log(), 10, what="the worker's welcome")
    assert closed_in(worker) < 1.5


def test_exit_without_a_sidecar_is_instant(
    spawn_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    script = tmp_path / "exit_worker.py"
    script.write_text(EXIT_WORKER.replace("wait_connected(10)", "wait_connected(0.2)"))
    worker = spawn_worker(str(script), "100", "late", rank=0)
    assert closed_in(worker) < 0.1


def test_reconnect_says_hello_before_an_old_calls_reply(
    fake_sidecar: FakeSidecar, spawn_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    # The second hello is slow to encode, so a reply to a call of the first
    # session is ready while the second session is being opened.
    script = tmp_path / "reconnect_worker.py"
    script.write_text(
        """
import time

import worker_hooks
from worker_hooks import Response, protocol

hellos = 0
encode = protocol.encode_checked


def slow_hello(header, body=b"", max_frame=protocol.DEFAULT_MAX_FRAME):
    global hellos
    if header.get("type") == "hello":
        hellos += 1
        if hellos == 2:
            time.sleep(0.6)
    return encode(header, body, max_frame)


def slow(request):
    time.sleep(0.3)
    return Response("late")


protocol.encode_checked = slow_hello
worker_hooks.register_handler("slow", slow)
with worker_hooks.worker_main():
    while True:
        time.sleep(0.01)
"""
    )
    worker = spawn_worker(str(script), rank=0)
    first = fake_sidecar.accept()
    assert first.read()[0]["type"] == "hello"
    first.welcome()
    call = {"type": "call", "id": 1, "handler": "slow", "params": [], "deadline": time.time() + 30}
    first.send(call)
    time.sleep(0.1)
    first.close()
    second = fake_sidecar.accept()
    header, _ = second.read()
    assert header["type"] == "hello", header
    second.welcome()
    # The session goes on as usual: heartbeats, and calls are answered.
    second.send({**call, "id": 2, "handler": "ping"})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        header, body = second.read()
        if header["type"] == "reply" and header["id"] == 2:
            assert (header["status"], body) == (200, b"pong")
            break
    else:
        raise AssertionError("no reply to the ping")
    assert worker.proc.poll() is None, worker.log()
