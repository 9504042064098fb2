"""Faults that real training jobs meet, each with real sidecar and worker processes.

After each fault the other workers and the HTTP API keep working, and the
sidecar's state (workers, events, metrics) says what happened. Covered
elsewhere: a SIGKILLed worker (test_foundation), a worker holding the GIL
(test_stalls), a restarted rank (test_foundation).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, SidecarProcess, WorkerProcess, wait_for
from test_stalls import events_of, metric_value
from wire import RawPeer

sys.path.insert(0, str(ROOT / "bench"))
from soak import parse_samples

SOAK_WORKER = str(ROOT / "bench" / "soak_worker.py")
SidecarFactory = Callable[..., SidecarProcess]
Spawn = Callable[..., WorkerProcess]


def ping(side: SidecarProcess, rank: int | str, timeout: float = 5) -> httpx.Response:
    return side.client.post(f"/api/v1/workers/{rank}/handlers/ping?timeout={timeout}")


def api_works(side: SidecarProcess, rank: int) -> None:
    """The HTTP API answers and worker ``rank`` answers through it."""
    assert ping(side, rank).text == "pong"
    assert side.client.get("/metrics").status_code == 200
    assert side.client.get("/api/v1/workers").status_code == 200
    assert side.client.get("/api/v1/events").status_code == 200


# -- a worker stopped with SIGSTOP ----------------------------------------------------


def is_stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped by a signal: its state in /proc is T."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The state letter follows the command name, which may hold ") ".
    return stat[stat.rfind(")") + 2 :][:1] == "T"


def test_sigstopped_worker_is_stalled_then_resumes(
    sidecar_factory: SidecarFactory, spawn_worker: Spawn, tmp_path: Path
) -> None:
    side = sidecar_factory(
        "--heartbeat-timeout", "1",
        "--dump-timeout", "0.5",
        "--dump-dir", str(tmp_path / "dumps"),
    )  # fmt: skip
    spawn_worker(rank=0)
    stopped = spawn_worker(rank=1)
    side.wait_workers(2)
    os.kill(stopped.pid, signal.SIGSTOP)
    try:
        # kill() returns before the stop takes hold: a ping sent at once may
        # still be answered (the connection thread answers it without a hand-off).
        wait_for(lambda: is_stopped(stopped.pid), 5, what="the worker to stop")
        started = time.monotonic()
        late = ping(side, 1, timeout=0.5)
        assert late.status_code == 504 and time.monotonic() - started < 1.5
        fan = side.client.post("/api/v1/handlers/ping?timeout=1").json()
        assert fan["ranks"]["0"]["status"] == 200 and fan["ranks"]["1"]["status"] == 408
        stalled = wait_for(lambda: events_of(side, "worker_stalled"), 10, what="a stall")
        assert stalled[0]["worker"] == "1" and "no heartbeat" in stalled[0]["data"]["reason"]
        entry = side.worker("1")
        assert entry is not None and entry["state"] == "running" and entry["stalled"]
        failed = events_of(side, "handler_failed")
        assert any(e["worker"] == "1" and e["data"]["status"] == 504 for e in failed)
        api_works(side, 0)
        # Every rank's stacks were asked for; the stopped one is recorded as silent.
        dumps = wait_for(
            lambda: [
                d
                for d in side.client.get("/api/v1/dumps").json()["dumps"]
                if d["worker"] == "1" and d["what"] == "dump_traceback_no_answer"
            ],
            10,
            what="a no-answer record for the stopped worker",
        )
        assert dumps
    finally:
        os.kill(stopped.pid, signal.SIGCONT)
    resumed = wait_for(lambda: events_of(side, "worker_resumed"), 10, what="a resume")
    assert resumed[0]["worker"] == "1"
    assert ping(side, 1).text == "pong"
    assert side.worker("1")["stalled"] is False  # type: ignore[index]


# -- the sidecar SIGKILLed and restarted while workers train on ---------------------------


def exposed_counts(side: SidecarProcess) -> dict[tuple[str, str, str], float]:
    text = side.client.get("/metrics").text
    found = parse_samples(text, {"soak_events_total", "soak_latency_seconds_count"})
    return {(name, labels["rank"], labels["shard"]): value for name, labels, value in found}


def test_sidecar_sigkill_and_restart_lose_and_double_count_nothing(
    sidecar_factory: SidecarFactory, spawn_worker: Spawn, tmp_path: Path
) -> None:
    side = sidecar_factory("--grace", "600")
    totals = [tmp_path / f"totals-{rank}.json" for rank in range(2)]
    workers = [spawn_worker(SOAK_WORKER, "200", str(totals[r]), rank=r) for r in range(2)]
    side.wait_workers(2)
    wait_for(lambda: {k[1] for k in exposed_counts(side)} == {"0", "1"}, 10, what="series")
    current = side
    try:
        for outage in (0.3, 1.5):
            steps_before = {w["key"]: w["steps"] for w in current.workers()}
            assert current.stop(signal.SIGKILL) == -signal.SIGKILL
            time.sleep(outage)  # the workers train on without a sidecar
            assert all(w.proc.poll() is None for w in workers)
            current = SidecarProcess(
                current.socket_path, current.port, current.args, current.log_path
            ).start()
            back = current.wait_workers(2, timeout=10)
            # Counting went on during the outage, and the first push after the
            # reconnection carries the whole of it.
            assert all(w["steps"] > steps_before[w["key"]] for w in back)
            wait_for(lambda s=current: {k[1] for k in exposed_counts(s)} == {"0", "1"}, 10)
        for worker in workers:
            worker.proc.send_signal(signal.SIGTERM)
        assert [w.proc.wait(10) for w in workers] == [0, 0]
        ended = {w["key"]: w for w in current.wait_workers(2, state="exited")}
        exposed = exposed_counts(current)
        for rank in range(2):
            counted = json.loads(totals[rank].read_text())
            assert counted["steps"] > 20
            assert ended[str(rank)]["steps"] == counted["steps"]
            for name, values in (
                ("soak_events_total", counted["events"]),
                ("soak_latency_seconds_count", counted["observed"]),
            ):
                got = [exposed.get((name, str(rank), str(i))) for i in range(len(values))]
                assert got == [float(v) for v in values], name
    finally:
        if current is not side and current.proc is not None and current.proc.poll() is None:
            current.proc.kill()
            current.proc.wait()
        current.client.close()


# -- a handler that hangs ------------------------------------------------------------------


def test_hung_handlers_cost_only_their_own_calls(
    sidecar_factory: SidecarFactory, spawn_worker: Spawn
) -> None:
    side = sidecar_factory("--heartbeat-timeout", "1.5")
    spawn_worker(rank=0)
    spawn_worker("fault_worker.py", rank=1)
    side.wait_workers(2)
    # Every handler thread of rank 1 hangs; each caller gets its 504 on time.
    for _ in range(4):
        started = time.monotonic()
        assert side.client.post("/api/v1/workers/1/handlers/hang?timeout=0.3").status_code == 504
        assert time.monotonic() - started < 1.0
    # Calls queued behind them time out too...
    for _ in range(3):
        assert side.client.post("/api/v1/workers/1/handlers/count?timeout=0.2").status_code == 504
    # ...while rank 1 keeps training and sending heartbeats, so it is not stalled.
    steps = side.worker("1")["steps"]  # type: ignore[index]
    time.sleep(1.6)
    entry = side.worker("1")
    assert entry is not None and entry["state"] == "running" and not entry["stalled"]
    assert entry["steps"] > steps
    api_works(side, 0)
    # ping and dump_traceback run on the connection thread: rank 1 still
    # answers them, and shows where its handler threads hang.
    fan = side.client.post("/api/v1/handlers/ping?timeout=0.5").json()
    assert fan["ranks"]["0"]["status"] == 200 and fan["ranks"]["1"]["status"] == 200
    stacks = side.client.post("/api/v1/workers/1/handlers/dump_traceback?timeout=0.5")
    assert stacks.status_code == 200 and stacks.text.count("in hang") == 4
    failed = [e for e in events_of(side, "handler_failed") if e["worker"] == "1"]
    assert {e["data"]["handler"] for e in failed} >= {"hang", "count"}
    assert metric_value(side, 'rankside_handler_calls_total{handler="hang",status="504"}') == 4


def test_a_programs_own_ping_runs_on_a_handler_thread(
    sidecar_factory: SidecarFactory, spawn_worker: Spawn
) -> None:
    # Only rankside's own ping is run by the connection thread: a program's
    # handler of that name may block, and must block no other call.
    side = sidecar_factory()
    spawn_worker("fault_worker.py", rank=0, env={"SLOW_PING": "3"})
    side.wait_workers(1)
    assert side.client.post("/api/v1/workers/0/handlers/ping?timeout=0.3").status_code == 504
    started = time.monotonic()
    assert side.client.post("/api/v1/workers/0/handlers/count?timeout=2").text == "1"
    assert time.monotonic() - started < 1.0


def test_calls_given_up_on_are_not_run_later(
    sidecar_factory: SidecarFactory, spawn_worker: Spawn
) -> None:
    side = sidecar_factory()
    spawn_worker("fault_worker.py", rank=0)
    side.wait_workers(1)
    started = time.monotonic()
    for _ in range(4):
        side.client.post("/api/v1/workers/0/handlers/hang?seconds=2&timeout=0.1")
    for _ in range(5):
        assert side.client.post("/api/v1/workers/0/handlers/count?timeout=0.1").status_code == 504
    assert time.monotonic() - started < 1.8
    time.sleep(2.2 - (time.monotonic() - started))  # the handler threads are free again
    # The five queued calls were past their deadline: none of them ran.
    assert side.client.post("/api/v1/workers/0/handlers/count").text == "1"


def test_worker_with_a_hung_handler_still_exits(
    sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    side = sidecar_factory()
    code = (
        "import time, worker_hooks\n"
        "import fault_worker\n"
        "with worker_hooks.worker_main():\n"
        "    worker_hooks.current_connection().wait_connected(10)\n"
        "    time.sleep(1.5)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests' / 'workers'}", "RANK": "0"}
    env["RANKSIDE_SOCKET"] = side.socket_path
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        side.wait_workers(1)
        assert side.client.post("/api/v1/workers/0/handlers/hang?timeout=0.2").status_code == 504
        # Training ends with the handler still blocked: the process exits anyway.
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    exited = side.wait_workers(1, state="exited")
    assert exited[0]["exit"]["reason"] == "exit"


# -- a worker that floods frames -------------------------------------------------------------


FLOODER = """
import socket, sys, time
sys.path.insert(0, {root!r})
from worker_hooks import protocol
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect({path!r})
hello = {{"type": "hello", "version": 1, "handlers": [],
          "identity": {{"rank": 9, "pid": 0, "hostname": "flood", "role": "flood"}}}}
sock.sendall(protocol.encode(hello))
beat = protocol.encode({{"type": "heartbeat", "step": 1, "steps": 1, "progress_time": 1.0}})
stray = protocol.encode({{"type": "reply", "id": 1, "status": 200, "content_type": "x"}},
                        b"x" * 60000)
burst = beat * 500 + stray * 4
while True:
    sock.sendall(burst)
"""


def test_flooding_worker_does_not_starve_the_others(
    sidecar_factory: SidecarFactory, spawn_worker: Spawn
) -> None:
    side = sidecar_factory()
    spawn_worker(rank=0)
    side.wait_workers(1)
    flooder = subprocess.Popen(
        [sys.executable, "-c", FLOODER.format(root=str(ROOT), path=side.socket_path)]
    )
    try:
        wait_for(lambda: side.worker("9"), 10, what="the flooder")
        received_before = metric_value(side, 'rankside_frames_received_total{type="heartbeat"}')
        latencies = []
        for _ in range(30):
            started = time.monotonic()
            assert ping(side, 0).text == "pong"
            latencies.append(time.monotonic() - started)
            assert side.client.get("/metrics").status_code == 200
        received_after = metric_value(side, 'rankside_frames_received_total{type="heartbeat"}')
        # The flood was read all along, at its frame budget (--max-frame-rate:
        # tests/test_flood.py measures it), not cut off...
        assert (received_after or 0) - (received_before or 0) > 0
        assert (metric_value(side, "rankside_frames_throttled_total") or 0) > 0
        # ...and rank 0's calls were answered between its frames.
        latencies.sort()
        assert latencies[len(latencies) // 2] < 0.25, latencies
        assert side.worker("9")["state"] == "running"  # type: ignore[index]
    finally:
        flooder.kill()
        flooder.wait()
    wait_for(lambda: (side.worker("9") or {}).get("state") == "disconnected", 5)
    api_works(side, 0)


# -- the socket's directory removed -------------------------------------------------------------


def test_removed_socket_directory_is_recreated(
    sidecar_factory: SidecarFactory, spawn_worker: Spawn, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run" / "rankside"
    path = str(run_dir / "rankside.sock")
    side = sidecar_factory("--dump-dir", str(tmp_path / "dumps"), socket_path=path)
    spawn_worker(rank=0, socket_path=path)
    side.wait_workers(1)
    shutil.rmtree(tmp_path / "run")
    # Connected workers never needed the file.
    api_works(side, 0)
    recreated = wait_for(lambda: events_of(side, "socket_recreated"), 5, what="a rebind")
    assert recreated[0]["data"]["path"] == path
    assert os.path.exists(path) and oct(os.stat(path).st_mode & 0o777) == "0o600"
    # A worker that starts now finds the sidecar.
    spawn_worker(rank=1, socket_path=path)
    side.wait_workers(2)
    api_works(side, 1)
    assert side.client.get("/readyz").status_code == 200
    # On shutdown the sidecar removes the file it bound last.
    assert side.stop() == 0
    assert not os.path.exists(path)


# -- the dump directory's disk full -----------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(directory: Path, size: str) -> Iterator[None]:
    directory.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {exc}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def test_full_dump_disk_is_recorded_and_survived(
    sidecar_factory: SidecarFactory, spawn_worker: Spawn, tmp_path: Path
) -> None:
    dumps = tmp_path / "dumps"
    with small_filesystem(dumps, "64k"):
        filler = dumps / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as fp:
            while True:
                fp.write(b"\0" * 4096)
                fp.flush()
        side = sidecar_factory("--dump-dir", str(dumps), "--dump-interval", "0.3")
        spawn_worker(rank=0)
        spawn_worker(rank=1)
        side.wait_workers(2)
        failed = wait_for(lambda: events_of(side, "dump_failed"), 10, what="a failed dump")
        assert "No space left on device" in failed[0]["message"]
        assert not [p for p in dumps.iterdir() if p.suffix == ".partial"]
        api_works(side, 0)
        api_works(side, 1)
        assert side.client.get("/api/v1/dumps").status_code == 200
        # Space again: dumps are written again, with no restart.
        filler.unlink()
        wait_for(lambda: side.client.get("/api/v1/dumps").json()["dumps"], 10, what="a dump")
        side.stop()


# -- workers SIGKILLed while calls to them are in flight -------------------------------------------


def test_calls_in_flight_to_a_killed_worker_end_with_503(
    sidecar_factory: SidecarFactory, spawn_worker: Spawn
) -> None:
    side = sidecar_factory()
    spawn_worker(rank=0)
    victim = spawn_worker("fault_worker.py", rank=1)
    side.wait_workers(2)
    statuses: list[int] = []

    def call() -> None:
        with httpx.Client(base_url=side.url, timeout=30) as client:
            statuses.append(client.post("/api/v1/workers/1/handlers/hang?timeout=20").status_code)

    callers = [threading.Thread(target=call) for _ in range(3)]
    for caller in callers:
        caller.start()
    time.sleep(0.5)  # the three calls are waiting in the worker's handler threads
    started = time.monotonic()
    victim.proc.kill()
    for caller in callers:
        caller.join(10)
    assert statuses == [503, 503, 503]
    assert time.monotonic() - started < 2
    entry = wait_for(lambda: (w := side.worker("1")) and w["state"] == "disconnected" and w, 5)
    assert entry["exit"] is None
    api_works(side, 0)


def test_calls_to_a_worker_that_reads_nothing_are_not_queued_without_bound(
    sidecar_factory: SidecarFactory, spawn_worker: Spawn
) -> None:
    """A registered peer that stops reading (stopped, wedged): calls to it fail fast."""
    side = sidecar_factory()
    spawn_worker(rank=0)
    side.wait_workers(1)
    peer = RawPeer(side.socket_path)
    peer.hello(rank=5)
    assert peer.read()[0]["type"] == "welcome"
    body = b"x" * 1_000_000
    statuses = []
    for _ in range(12):
        response = side.client.post("/api/v1/workers/5/handlers/x?timeout=0.1", content=body)
        statuses.append(response.status_code)
        if response.status_code == 503:
            assert "not reading its socket" in response.json()["error"]
    # A few megabytes are queued for it, then calls are refused at once.
    assert statuses[0] == 504 and statuses[-1] == 503, statuses
    api_works(side, 0)
    peer.close()
