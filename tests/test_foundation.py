"""The foundation, end to end: real sidecar and worker processes over a real socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import ROOT, SidecarProcess, wait_for
from wire import RawPeer

from worker_hooks import protocol


def test_health_endpoints(sidecar: SidecarProcess) -> None:
    assert sidecar.client.get("/healthz").text == "ok"
    assert sidecar.client.get("/readyz").status_code == 200


def test_workers_register_and_list(sidecar: SidecarProcess, spawn_worker) -> None:
    spawn_worker(rank=0, env={"ROLE_NAME": "trainer", "TORCHELASTIC_RUN_ID": "job-7"})
    spawn_worker(rank=1)
    anonymous = spawn_worker()
    workers = sidecar.wait_workers(3)
    by_key = {w["key"]: w for w in workers}
    assert set(by_key) == {"0", "1", f"pid-{anonymous.pid}"}
    zero = by_key["0"]
    assert zero["rank"] == 0 and zero["local_rank"] == 0 and zero["world_size"] == 4
    assert zero["role"] == "trainer" and zero["run_id"] == "job-7"
    assert zero["hostname"] == socket.gethostname()
    assert "ping" in zero["handlers"]
    assert by_key[f"pid-{anonymous.pid}"]["rank"] is None
    # Progress arrives with the heartbeats.
    wait_for(lambda: (sidecar.worker("0") or {}).get("step", None) not in (None, 0), 5)
    assert sidecar.client.get("/api/v1/workers/1").json()["rank"] == 1
    missing = sidecar.client.get("/api/v1/workers/99")
    assert missing.status_code == 404
    assert "99" in missing.json()["error"]


def test_ping_is_relayed(sidecar: SidecarProcess, spawn_worker) -> None:
    spawn_worker(rank=0)
    sidecar.wait_workers(1)
    response = sidecar.client.post("/api/v1/workers/0/handlers/ping")
    assert response.status_code == 200
    assert response.text == "pong"
    assert response.headers["content-type"].startswith("text/plain")
    unknown = sidecar.client.post("/api/v1/workers/0/handlers/nonexistent")
    assert unknown.status_code == 404
    assert unknown.text == "Handler nonexistent not found: Failed to find handler nonexistent"
    assert sidecar.client.post("/api/v1/workers/5/handlers/ping").status_code == 404


def test_relay_deadline_and_late_reply(sidecar: SidecarProcess, spawn_worker) -> None:
    spawn_worker("handler_worker.py", rank=0)
    sidecar.wait_workers(1)
    started = time.monotonic()
    late = sidecar.client.post("/api/v1/workers/0/handlers/sleep?seconds=1&timeout=0.3")
    elapsed = time.monotonic() - started
    assert late.status_code == 504, late.text
    assert "0.3" in late.json()["error"]
    assert elapsed < 0.9
    time.sleep(1.0)  # the late reply arrives now and must be dropped quietly
    body = os.urandom(1000)
    echo = sidecar.client.post("/api/v1/workers/0/handlers/echo", content=body)
    assert echo.status_code == 200 and echo.content == body
    assert sidecar.client.post("/api/v1/workers/0/handlers/ping").text == "pong"
    for bad in ("abc", "0", "-1", "100000", "nan"):
        response = sidecar.client.post(f"/api/v1/workers/0/handlers/ping?timeout={bad}")
        assert response.status_code == 400, bad
        assert "timeout" in response.json()["error"]


BAD_HANDLER_WORKER = """
import time
from http import HTTPStatus

import worker_hooks
from worker_hooks import HandlerError, Response

BAD = {
    "status_str": lambda request: Response("x", status="200"),
    "status_float": lambda request: Response("x", status=200.0),
    "status_bool": lambda request: Response("x", status=True),
    "status_700": lambda request: Response("x", status=700),
    "content_type_none": lambda request: Response("x", content_type=None),
    "content_type_surrogate": lambda request: Response("x", content_type="text/\\udc80"),
    "body_dict": lambda request: Response({"loss": 1.0}),
    "body_surrogate": lambda request: Response("\\udc80"),
    "error_status_str": lambda request: (_ for _ in ()).throw(HandlerError("no", status="400")),
    "raises_surrogate": lambda request: (_ for _ in ()).throw(RuntimeError("\\udc80")),
}
for name, fn in BAD.items():
    worker_hooks.register_handler(name, fn)
worker_hooks.register_handler("created", lambda request: Response(b"new", HTTPStatus.CREATED))
worker_hooks.register_handler("no_content", lambda request: Response(b"", 204))
worker_hooks.register_handler("reset", lambda request: Response(b"dropped", 205, "text/html"))

with worker_hooks.worker_main():
    while True:
        time.sleep(0.01)
"""


def server_headers(response: httpx.Response) -> dict[str, str]:
    """The headers uvicorn adds to every response."""
    return {k: response.headers[k] for k in ("date", "server")}


def test_bad_handler_results_answer_500_and_keep_the_worker(
    sidecar: SidecarProcess, spawn_worker, tmp_path: Path
) -> None:
    script = tmp_path / "bad_handler_worker.py"
    script.write_text(BAD_HANDLER_WORKER)
    spawn_worker(str(script), rank=0)
    sidecar.wait_workers(1)
    expected = {
        "status_str": "TypeError: status must be an int, not str",
        "status_float": "TypeError: status must be an int, not float",
        "status_bool": "TypeError: status must be an int, not bool",
        "status_700": "ValueError: status 700 is not an HTTP status (100-599)",
        "content_type_none": "TypeError: content_type must be a str, not NoneType",
        "content_type_surrogate": "UnicodeEncodeError: ",
        "body_dict": "TypeError: body must be bytes or str, not dict",
        "body_surrogate": "UnicodeEncodeError: ",
        "error_status_str": "TypeError: status must be an int, not str",
        "raises_surrogate": "RuntimeError: \\udc80",
    }
    for name, message in expected.items():
        started = time.monotonic()
        response = sidecar.client.post(f"/api/v1/workers/0/handlers/{name}")
        assert time.monotonic() - started < 2, name
        assert response.status_code == 500, (name, response.text)
        assert response.text.startswith(f"Handler {name} failed: {message}"), response.text
        assert sidecar.client.post("/api/v1/workers/0/handlers/ping").text == "pong", name
    created = sidecar.client.post("/api/v1/workers/0/handlers/created")
    assert (created.status_code, created.content) == (201, b"new")
    sandbox = {"content-security-policy": "sandbox", "x-content-type-options": "nosniff"}
    assert dict(created.headers) == {
        "content-type": "text/plain", "content-length": "3", **sandbox, **server_headers(created)
    }  # fmt: skip
    # No body after 204 or 205, and no Content-Length with a 204.
    empty = sidecar.client.post("/api/v1/workers/0/handlers/no_content")
    assert empty.status_code == 204 and "content-length" not in empty.headers
    reset = sidecar.client.post("/workers/0/handler/reset")
    assert (reset.status_code, reset.content, reset.headers["content-length"]) == (205, b"", "0")
    assert reset.headers["content-type"] == "text/html"
    assert reset.headers["content-security-policy"] == "sandbox"
    # The worker stayed on its first connection, and no frame of it was refused.
    events = sidecar.client.get("/api/v1/events").json()["events"]
    kinds = [event["kind"] for event in events]
    assert "frame_rejected" not in kinds
    assert kinds.count("worker_connected") == 1
    assert [w["state"] for w in sidecar.workers()] == ["running"]


def test_call_to_disconnected_worker_is_503(sidecar: SidecarProcess, spawn_worker) -> None:
    worker = spawn_worker(rank=2)
    sidecar.wait_workers(1)
    worker.proc.kill()
    wait_for(lambda: (sidecar.worker("2") or {}).get("state") == "disconnected", 5)
    response = sidecar.client.post("/api/v1/workers/2/handlers/ping")
    assert response.status_code == 503
    assert "not connected" in response.json()["error"]


def test_sigkilled_worker_is_disconnected_within_100ms(
    sidecar: SidecarProcess, spawn_worker
) -> None:
    worker = spawn_worker(rank=3)
    sidecar.wait_workers(1)
    killed_at = time.time()
    worker.proc.kill()
    state = wait_for(lambda: (w := sidecar.worker("3")) and w["state"] == "disconnected" and w, 5)
    assert state["exit"] is None
    assert state["ended_at"] - killed_at < 0.1


def test_clean_exit_and_exception_are_reported(
    sidecar: SidecarProcess, spawn_worker, tmp_path: Path
) -> None:
    clean = spawn_worker("train_loop.py", "5", rank=0)
    error_file = tmp_path / "error.json"
    failing = spawn_worker(
        "train_loop.py",
        rank=1,
        env={"RAISE_AT_STEP": "3", "TORCHELASTIC_ERROR_FILE": str(error_file)},
    )
    assert clean.proc.wait(10) == 0
    assert failing.proc.wait(10) == 1
    exited = sidecar.wait_workers(2, state="exited")
    by_rank = {w["rank"]: w for w in exited}
    assert by_rank[0]["exit"]["reason"] == "exit"
    assert by_rank[0]["step"] == 4
    assert by_rank[1]["exit"]["reason"] == "exception"
    assert by_rank[1]["exit"]["exc_type"] == "RuntimeError"
    assert by_rank[1]["exit"]["exc_message"] == "loss is NaN at step 3"
    # The error file is what torchrun's error handler reads back.
    record = json.loads(error_file.read_text())["message"]
    assert record["message"] == "RuntimeError: loss is NaN at step 3"
    assert "train_loop.py" in record["extraInfo"]["py_callstack"]
    assert "raise RuntimeError" in record["extraInfo"]["py_callstack"]
    assert abs(int(record["extraInfo"]["timestamp"]) - time.time()) < 60


def test_error_file_is_readable_by_torchrun(tmp_path: Path) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / "error.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHELASTIC_ERROR_FILE": str(error_file)}
    env.pop("RANKSIDE_SOCKET", None)
    code = (
        "import worker_hooks\nwith worker_hooks.worker_main():\n    raise ValueError('bad batch')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert proc.returncode == 1
    failure = ProcessFailure(local_rank=0, pid=1234, exitcode=1, error_file=str(error_file))
    # torchrun's summary reads the message and timestamp from exactly this layout.
    assert failure.message["message"] == "ValueError: bad batch"
    assert abs(failure.timestamp - time.time()) < 60
    assert "line 3, in <module>" in failure.message["extraInfo"]["py_callstack"]


def test_restarted_worker_replaces_its_entry(sidecar: SidecarProcess, spawn_worker) -> None:
    first = spawn_worker(rank=0)
    sidecar.wait_workers(1)
    first.proc.kill()
    wait_for(lambda: (sidecar.worker("0") or {}).get("state") == "disconnected", 5)
    second = spawn_worker(rank=0, env={"TORCHELASTIC_RESTART_COUNT": "1"})
    entry = wait_for(
        lambda: (
            (w := sidecar.worker("0")) and w["pid"] == second.pid and w["state"] == "running" and w
        ),
        10,
    )
    assert entry["restart_count"] == 1
    assert len(sidecar.workers()) == 1


def test_sidecar_restart_brings_every_worker_back(sidecar_factory, spawn_worker) -> None:
    side = sidecar_factory()
    workers = [spawn_worker(rank=r) for r in range(4)]
    side.wait_workers(4)
    assert side.stop() == 0
    time.sleep(0.5)  # workers run on without a sidecar
    assert all(w.proc.poll() is None for w in workers)
    again = SidecarProcess(side.socket_path, side.port, [], side.log_path).start()
    try:
        back = again.wait_workers(4, timeout=5)
        assert sorted(w["pid"] for w in back) == sorted(w.pid for w in workers)
        assert again.client.post("/api/v1/workers/3/handlers/ping").text == "pong"
    finally:
        again.stop()
        again.client.close()


def test_worker_starts_before_the_sidecar(sidecar_factory, spawn_worker, tmp_path: Path) -> None:
    side = sidecar_factory(start=False)
    worker = spawn_worker(rank=0)
    time.sleep(1.0)
    assert worker.proc.poll() is None
    side.start()
    # Backoff is capped at 2 s, so the worker is back within about that.
    side.wait_workers(1, timeout=4)


def test_hooks_are_inert_without_socket(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RANKSIDE_SOCKET"}
    env["PYTHONPATH"] = str(ROOT)
    code = (
        "import logging, threading, worker_hooks\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "with worker_hooks.worker_main():\n"
        "    worker_hooks.step()\n"
        "    assert worker_hooks.current_connection() is None\n"
        "    assert [t.name for t in threading.enumerate()] == ['MainThread']\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("RANKSIDE_SOCKET is not set") == 1


def test_missing_socket_is_said_without_logging_set_up() -> None:
    # A script that never configures logging must still be told why rankside
    # does nothing: an INFO line with no handler went nowhere.
    env = {k: v for k, v in os.environ.items() if k != "RANKSIDE_SOCKET"}
    env["PYTHONPATH"] = str(ROOT)
    code = "import worker_hooks\nwith worker_hooks.worker_main():\n    worker_hooks.step()\n"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("RANKSIDE_SOCKET is not set; worker hooks are inactive") == 1


def test_socket_file_mode_and_cleanup(sidecar: SidecarProcess) -> None:
    mode = stat.S_IMODE(os.stat(sidecar.socket_path).st_mode)
    assert mode == 0o600
    started = time.monotonic()
    assert sidecar.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 2.0
    assert not os.path.exists(sidecar.socket_path)


def test_group_access_socket_mode(sidecar_factory) -> None:
    side = sidecar_factory("--socket-group-access")
    assert stat.S_IMODE(os.stat(side.socket_path).st_mode) == 0o660


def test_sigint_stops_with_workers_connected(sidecar: SidecarProcess, spawn_worker) -> None:
    spawn_worker(rank=0)
    sidecar.wait_workers(1)
    started = time.monotonic()
    assert sidecar.stop(signal.SIGINT) == 0
    assert time.monotonic() - started < 2.0
    assert not os.path.exists(sidecar.socket_path)


def test_second_sidecar_is_refused_on_a_live_socket(
    sidecar: SidecarProcess, sidecar_factory
) -> None:
    second = sidecar_factory(socket_path=sidecar.socket_path, start=False)
    second.start(wait=False)
    assert second.proc is not None
    assert second.proc.wait(15) == 1
    assert "another sidecar is already serving" in second.log()
    # The first one is untouched.
    assert os.path.exists(sidecar.socket_path)
    assert sidecar.client.get("/readyz").status_code == 200


def test_stale_socket_file_is_replaced(sidecar_factory, tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # a socket file that nobody listens on, as a SIGKILLed sidecar leaves
    side = sidecar_factory(socket_path=path)
    assert side.client.get("/readyz").status_code == 200


def test_malformed_frames_are_rejected_others_keep_working(sidecar_factory, spawn_worker) -> None:
    side = sidecar_factory("--max-frame", "65536")
    spawn_worker(rank=0)
    side.wait_workers(1)
    bad_frames = {
        "garbage": b"\x00\x00\x00\x05\x00\x00\x00\x00hello",
        "invalid utf-8": protocol.PREFIX.pack(2, 0) + b"\xff\xfe",
        "not an object": protocol.PREFIX.pack(2, 0) + b"[]",
        "no type": protocol.PREFIX.pack(2, 0) + b"{}",
        "unknown type": protocol.encode({"type": "launch_missiles"}),
        "wrong field type": protocol.encode(
            {"type": "hello", "version": "1", "identity": {}, "handlers": []}
        ),
        "oversize": protocol.PREFIX.pack(10, 1 << 30),
        "empty header": protocol.PREFIX.pack(0, 0),
    }
    for name, frame in bad_frames.items():
        peer = RawPeer(side.socket_path)
        peer.send_raw(frame)
        header, _ = peer.read()
        assert header["type"] == "error", name
        assert header["message"], name
        assert peer.closed_by_peer(), name
        peer.close()
        assert side.client.post("/api/v1/workers/0/handlers/ping").text == "pong", name
    # A registered peer that turns bad mid-stream is cut off too.
    peer = RawPeer(side.socket_path)
    peer.hello(rank=7)
    assert peer.read()[0]["type"] == "welcome"
    peer.send({"type": "heartbeat", "step": "x", "steps": 1, "progress_time": 0})
    header, _ = peer.read()
    assert header["type"] == "error" and "'step'" in header["message"]
    assert peer.closed_by_peer()
    wait_for(lambda: (side.worker("7") or {}).get("state") == "disconnected", 5)
    assert side.client.post("/api/v1/workers/0/handlers/ping").text == "pong"


def test_truncated_frame_and_version_mismatch(sidecar: SidecarProcess) -> None:
    peer = RawPeer(sidecar.socket_path)
    peer.hello(rank=5)
    assert peer.read()[0]["type"] == "welcome"
    frame = protocol.encode({"type": "heartbeat", "step": 1, "steps": 2, "progress_time": 1.0})
    peer.send_raw(frame[:-3])
    peer.close()  # the worker died mid-frame
    wait_for(lambda: (sidecar.worker("5") or {}).get("state") == "disconnected", 5)

    peer = RawPeer(sidecar.socket_path)
    peer.hello(rank=6, version=99)
    header, _ = peer.read()
    assert header["type"] == "error"
    assert "version 99" in header["message"] and "version 1" in header["message"]
    assert peer.closed_by_peer()
    assert sidecar.worker("6") is None


def test_silent_peer_is_dropped_after_handshake_timeout(sidecar_factory) -> None:
    side = sidecar_factory("--handshake-timeout", "0.3")
    peer = RawPeer(side.socket_path)
    header, _ = peer.read()
    assert header["type"] == "error" and "no hello" in header["message"]
    assert peer.closed_by_peer()


def test_frame_at_the_limit_is_read(sidecar_factory) -> None:
    side = sidecar_factory("--max-frame", "200000")
    peer = RawPeer(side.socket_path)
    peer.hello(rank=1)
    assert peer.read()[0]["type"] == "welcome"
    # A reply to no call, with a big body: read, matched to nothing, dropped.
    peer.send({"type": "reply", "id": 12345, "status": 200, "content_type": "x"}, b"x" * 150000)
    peer.send({"type": "heartbeat", "step": 4, "steps": 5, "progress_time": time.time()})
    wait_for(lambda: (side.worker("1") or {}).get("step") == 4, 5)


def test_out_of_range_numbers_are_refused_with_an_error_frame(sidecar: SidecarProcess) -> None:
    huge = "9" * 400
    heartbeat = f'{{"type":"heartbeat","step":1,"steps":{huge},"progress_time":1}}'.encode()
    payload = (
        '{"v":1,"full":true,"families":[[0,"tokens","counter","doc",[],null]],'
        f'"series":[[0,0,[]]],"values":[0,{huge}],"dropped":0}}'
    ).encode()
    frames = {
        "heartbeat": protocol.PREFIX.pack(len(heartbeat), 0) + heartbeat,
        "metrics": protocol.encode({"type": "metrics"}, payload),
    }
    for rank, (name, frame) in enumerate(frames.items(), start=20):
        peer = RawPeer(sidecar.socket_path)
        peer.hello(rank=rank)
        assert peer.read()[0]["type"] == "welcome"
        peer.send_raw(frame)
        header, _ = peer.read()
        assert header["type"] == "error", name
        assert "out of range" in header["message"], (name, header["message"])
        assert peer.closed_by_peer(), name
    metrics = sidecar.client.get("/metrics").text
    assert 'rankside_frames_rejected_total{reason="malformed"} 1.0' in metrics
    assert 'rankside_frames_rejected_total{reason="bad_metrics"} 1.0' in metrics
    assert sidecar.client.get("/api/v1/workers").status_code == 200


def test_a_replaced_connection_no_longer_speaks_for_its_rank(sidecar: SidecarProcess) -> None:
    old = RawPeer(sidecar.socket_path)
    old.hello(rank=9)
    assert old.read()[0]["type"] == "welcome"
    new = RawPeer(sidecar.socket_path)
    new.hello(rank=9)
    assert new.read()[0]["type"] == "welcome"
    # The old process says goodbye late: the running rank 9 is not ended by it.
    old.send({"type": "bye", "reason": "exception", "exc_type": "Stale", "exc_message": "old"})
    new.send({"type": "heartbeat", "step": 3, "steps": 4, "progress_time": time.time()})
    entry = wait_for(lambda: (w := sidecar.worker("9")) and w["step"] == 3 and w, 5)
    assert entry["state"] == "running" and entry["exit"] is None
    kinds = [e["kind"] for e in sidecar.client.get("/api/v1/events").json()["events"]]
    assert "worker_exited" not in kinds
