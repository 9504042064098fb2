"""The worker's connection under the careless values training code passes, with real processes.

Each case once cost a worker its connection: a frame the sidecar refused (and
a reconnect every 60 ms), a connection thread dead for good, or one reply or
exit message that closed the whole connection. Real sidecar processes and
real worker processes (``tests/workers/careless_worker.py``) over real unix
sockets; the backoff case uses a plain socket server as a sidecar that
welcomes a worker and then refuses its frames.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from conftest import SidecarProcess, WorkerProcess, wait_for
from scrape import check_scrapes, samples_of
from wire import RawPeer

from sidecar.node.connection import process_running
from worker_hooks import protocol

WORKER = "careless_worker.py"


def events(sidecar: SidecarProcess, kind: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = sidecar.client.get("/api/v1/events").json()["events"]
    return [e for e in found if e["kind"] == kind]


def call(sidecar: SidecarProcess, name: str, **params: str) -> httpx.Response:
    return sidecar.client.post(f"/api/v1/workers/0/handlers/{name}", params=params)


def test_careless_steps_are_refused_at_the_call_and_int_likes_become_ints(
    sidecar: SidecarProcess, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    worker = spawn_worker(WORKER, "--steps", "--torch", rank=0)
    wait_for(lambda: "stepped" in worker.log(), 60, what="the worker's steps")
    refused = [line for line in worker.log().splitlines() if line.startswith("refused")]
    assert refused == [
        "refused 'abc': TypeError: step must be an integer, not str 'abc'",
        "refused 1.5: TypeError: step must be an integer, not float 1.5",
        "refused True: TypeError: step must be an integer, not the bool True",
        f"refused {10**30}: ValueError: step {10**30} is out of range (a 64-bit integer)",
        "refused nan: TypeError: step must be an integer, not float nan",
    ], worker.log()
    # The int-like object and the tensor are steps 41 and 42: two steps in all.
    state = wait_for(lambda: (sidecar.worker("0") or {}).get("step") == 42 and sidecar.worker("0"))
    assert state["state"] == "running" and state["steps"] == 2, state
    assert call(sidecar, "good").text == "good"
    assert events(sidecar, "frame_rejected") == []
    assert len(events(sidecar, "worker_connected")) == 1
    assert "Traceback" not in worker.log()


def test_a_handler_name_with_a_lone_surrogate_is_refused_and_the_connection_lives(
    sidecar: SidecarProcess, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    worker = spawn_worker(WORKER, "--bad-handler-name", rank=0)
    sidecar.wait_workers(1)
    assert "refused handler name: handler name 'h\\udc80' is not valid UTF-8" in worker.log()
    # Registered after the hello, so it reached the sidecar in a handlers frame.
    wait_for(lambda: call(sidecar, "good").status_code == 200, 10, what="the good handler")
    time.sleep(1.5)  # heartbeats and metrics keep flowing on the same connection
    assert (sidecar.worker("0") or {}).get("state") == "running"
    assert len(events(sidecar, "worker_connected")) == 1
    assert events(sidecar, "frame_rejected") == []


def test_a_lone_surrogate_from_the_environment_does_not_stop_the_connection_thread(
    sidecar: SidecarProcess, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """A role read from the environment reached the hello and killed the thread for good."""
    # subprocess encodes the environment with surrogateescape: the worker sees "\udcff".
    worker = spawn_worker(WORKER, rank=0, env={"ROLE_NAME": "trainer\udcff"})
    (state,) = sidecar.wait_workers(1, timeout=20)
    assert state["role"] == "trainer\\udcff", state
    assert call(sidecar, "good").text == "good"
    warnings = [line for line in worker.log().splitlines() if "hello frame would be" in line]
    assert len(warnings) == 1, worker.log()
    assert "Traceback" not in worker.log()


def test_a_payload_over_the_frame_limit_is_split_not_refused(
    sidecar_factory: Callable[..., SidecarProcess], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """1,000 series are about 30 KB a push; the sidecar takes frames of 8 KiB."""
    sidecar = sidecar_factory("--max-frame", "8192")
    worker = spawn_worker("busy_series_worker.py", rank=0)
    sidecar.wait_workers(1)

    def shards() -> set[str]:
        return {
            sample.labels["shard"]
            for sample in samples_of(sidecar.client.get("/metrics").text)
            if sample.name == "shard_items_total"
        }

    wait_for(lambda: len(shards()) == 1000, 20, what="all 1,000 series on /metrics")
    time.sleep(2.5)  # incremental pushes, every series changed, are split too
    assert len(shards()) == 1000
    assert events(sidecar, "frame_rejected") == []
    assert len(events(sidecar, "worker_connected")) == 1
    assert worker.log().count("exceeds the sidecar's frame limit of") == 1, worker.log()
    check_scrapes([sidecar.client.get("/metrics").text])


def test_the_series_limit_counts_only_the_programs_own_series(
    sidecar_factory: Callable[..., SidecarProcess], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """RANKSIDE_MAX_SERIES=5 left room for 2 series: the built-in ones counted too."""
    sidecar = sidecar_factory()
    spawn_worker("busy_series_worker.py", "8", rank=0, env={"RANKSIDE_MAX_SERIES": "5"})
    sidecar.wait_workers(1)

    def scraped() -> dict[str, list[Any]]:
        found: dict[str, list[Any]] = {}
        for sample in samples_of(sidecar.client.get("/metrics").text):
            found.setdefault(sample.name, []).append(sample)
        return found

    wait_for(lambda: scraped().get("shard_items_total"), 10, what="the worker's series")
    found = scraped()
    assert sorted(s.labels["shard"] for s in found["shard_items_total"]) == [
        "0",
        "1",
        "2",
        "3",
        "4",
    ]
    (dropped,) = found["rankside_worker_dropped_series_total"]
    assert dropped.value == 3
    # The built-ins are all there beside them.
    assert found["rankside_worker_step_duration_seconds_count"]
    assert found["rankside_worker_cpu_seconds_total"]


def test_two_live_processes_with_one_rank_are_a_duplicate_not_a_restart(
    sidecar_factory: Callable[..., SidecarProcess], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """The second RANK=0 used to be a "restarted" event while the first trained on."""
    sidecar = sidecar_factory()
    first = spawn_worker("train_loop.py", rank=0)
    sidecar.wait_workers(1)
    second = spawn_worker("train_loop.py", rank=0)
    wait_for(lambda: events(sidecar, "worker_duplicate"), 10, what="a worker_duplicate event")
    (duplicate,) = events(sidecar, "worker_duplicate")
    assert duplicate["worker"] == "0"
    assert duplicate["data"] == {"pid": second.pid, "running_pid": first.pid}
    assert f"pid {first.pid}" in duplicate["message"] and "still running" in duplicate["message"]
    assert events(sidecar, "worker_restarted") == []
    assert "two processes claim this rank" in sidecar.log()
    assert first.proc.poll() is None and second.proc.poll() is None
    assert sidecar.worker("0")["pid"] == second.pid
    # A restart stays one.
    second.proc.kill()
    first.proc.kill()
    wait_for(lambda: sidecar.worker("0")["state"] != "running", 10, what="rank 0 gone")
    third = spawn_worker("train_loop.py", rank=0)
    wait_for(lambda: events(sidecar, "worker_restarted"), 10, what="a worker_restarted event")
    assert events(sidecar, "worker_restarted")[0]["data"]["pid"] == third.pid
    assert len(events(sidecar, "worker_duplicate")) == 1


def test_a_killed_process_not_yet_reaped_is_not_running() -> None:
    """A rank's old process may still be a zombie when its new one says hello."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert process_running(child.pid)
        child.kill()
        wait_for(lambda: not process_running(child.pid), 5, what="the zombie")
        assert child.poll() is not None  # reaped only now
    finally:
        child.kill()
        child.wait()
    assert not process_running(child.pid)
    assert not process_running(None) and not process_running(0)


def test_a_session_refused_soon_after_its_welcome_keeps_the_backoff_growing(
    tmp_path: Path, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """A sidecar that welcomes the worker and then refuses its frames is not hammered."""
    path = str(tmp_path / "refusing.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    server.settimeout(0.2)
    sessions: list[float] = []
    stop = threading.Event()

    def refuse_after_welcome() -> None:
        while not stop.is_set():
            try:
                sock, _ = server.accept()
            except TimeoutError:
                continue
            peer = RawPeer.__new__(RawPeer)
            peer.sock = sock
            sock.settimeout(5)
            try:
                peer.read()  # hello
                sessions.append(time.monotonic())
                peer.send({"type": "welcome", "version": protocol.PROTOCOL_VERSION, "key": "0"})
                peer.read()
                peer.send({"type": "error", "message": "frame refused"})
            except (OSError, EOFError):
                pass
            finally:
                sock.close()

    thread = threading.Thread(target=refuse_after_welcome, daemon=True)
    thread.start()
    try:
        spawn_worker(WORKER, socket_path=path, rank=0)
        wait_for(lambda: sessions, 20, what="the first session")
        time.sleep(5)
    finally:
        stop.set()
        thread.join(5)
        server.close()
    first = sessions[0]
    within = [t for t in sessions if t - first <= 5]
    # Doubling from 50 ms to 2 s: 8 sessions in 5 s; resetting at every welcome made ~80.
    assert len(within) <= 10, [round(t - first, 2) for t in sessions]
    gaps = [b - a for a, b in itertools.pairwise(within)]
    assert gaps[-1] > 1.0, gaps


def test_an_oversize_reply_is_a_413_and_other_calls_in_flight_are_answered(
    sidecar_factory: Callable[..., SidecarProcess], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    sidecar = sidecar_factory("--max-frame", str(4 * 1024 * 1024))
    spawn_worker(WORKER, rank=0)
    sidecar.wait_workers(1)
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(call, sidecar, "sleep", seconds="2")
        time.sleep(0.5)
        big = call(sidecar, "big", bytes=str(8 * 1024 * 1024))
        assert big.status_code == 413, (big.status_code, big.text[:200])
        assert "exceeds the 4194304 byte limit" in big.text, big.text
        assert slow.result().status_code == 200
    assert call(sidecar, "big", bytes="1000").content == b"x" * 1000
    assert events(sidecar, "worker_disconnected") == []
    assert events(sidecar, "frame_rejected") == []
    assert len(events(sidecar, "worker_connected")) == 1


def test_an_exception_message_over_1_mib_with_a_lone_surrogate_reaches_the_sidecar(
    sidecar: SidecarProcess, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    worker = spawn_worker(WORKER, "--raise", str(2 * 1024 * 1024), rank=0)
    worker.proc.wait(60)
    state = wait_for(lambda: (sidecar.worker("0") or {}).get("state") == "exited"
                     and sidecar.worker("0"), 10, what="the worker's exit")  # fmt: skip
    info = state["exit"]
    assert info["reason"] == "exception" and info["exc_type"] == "CarelessError", info
    assert info["exc_message"].startswith("bad \\udc80 mmm"), info["exc_message"][:100]
    assert len(info["exc_message"]) == protocol.MAX_EXIT_TEXT
    assert events(sidecar, "worker_disconnected") == []
    (exited,) = events(sidecar, "worker_exited")
    assert "CarelessError: bad \\udc80 mmm" in exited["message"]


def test_a_short_exception_message_with_a_lone_surrogate_reaches_the_sidecar(
    sidecar: SidecarProcess, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    worker = spawn_worker(WORKER, "--raise", "3", rank=0)
    worker.proc.wait(60)
    state = wait_for(lambda: (sidecar.worker("0") or {}).get("state") == "exited"
                     and sidecar.worker("0"), 10, what="the worker's exit")  # fmt: skip
    assert state["exit"]["exc_message"] == "bad \\udc80 mmm", state["exit"]
