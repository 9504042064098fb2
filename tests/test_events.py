"""The event log and its live stream, driven by real workers."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
from conftest import SidecarProcess, wait_for


def kinds_for(sidecar: SidecarProcess, worker: str) -> list[str]:
    events = sidecar.client.get("/api/v1/events").json()["events"]
    return [e["kind"] for e in events if e["worker"] == worker]


def test_lifecycle_events_newest_first(sidecar: SidecarProcess, spawn_worker) -> None:
    first = spawn_worker(rank=0)
    sidecar.wait_workers(1)
    first.proc.kill()
    wait_for(lambda: "worker_disconnected" in kinds_for(sidecar, "0"), 5)
    spawn_worker(rank=0, env={"TORCHELASTIC_RESTART_COUNT": "1"})
    wait_for(lambda: "worker_restarted" in kinds_for(sidecar, "0"), 10)
    failing = spawn_worker("train_loop.py", rank=1, env={"RAISE_AT_STEP": "2"})
    failing.proc.wait(10)
    wait_for(lambda: "worker_exited" in kinds_for(sidecar, "1"), 5)

    events = sidecar.client.get("/api/v1/events").json()["events"]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, reverse=True)
    assert kinds_for(sidecar, "0") == [
        "worker_restarted",
        "worker_disconnected",
        "worker_connected",
    ]
    exited = next(e for e in events if e["kind"] == "worker_exited")
    assert exited["data"]["exc_type"] == "RuntimeError"
    assert "loss is NaN at step 2" in exited["message"]
    restarted = next(e for e in events if e["kind"] == "worker_restarted")
    assert restarted["data"]["restart_count"] == 1

    newest = ids[0]
    assert sidecar.client.get(f"/api/v1/events?since={newest}").json()["events"] == []
    after = sidecar.client.get(f"/api/v1/events?since={ids[2]}").json()["events"]
    assert [e["id"] for e in after] == ids[:2]
    assert len(sidecar.client.get("/api/v1/events?limit=1").json()["events"]) == 1
    for bad in ("since=x", "since=-5", "limit=0"):
        response = sidecar.client.get(f"/api/v1/events?{bad}")
        assert response.status_code == 400, bad
    # Each event is one JSON line in the sidecar's log too.
    assert '"kind": "worker_restarted"' in sidecar.log()


def read_sse(
    url: str,
    headers: dict[str, str],
    want: int,
    out: list[dict[str, Any]],
    subscribed: threading.Event | None = None,
) -> None:
    with httpx.stream("GET", url, headers=headers, timeout=20) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        # Headers come after the route subscribed, so nothing is missed from here.
        if subscribed is not None:
            subscribed.set()
        event: dict[str, Any] = {}
        for line in response.iter_lines():
            if line.startswith("id: "):
                event["id"] = int(line[4:])
            elif line.startswith("event: "):
                event["event"] = line[7:]
            elif line.startswith("data: "):
                event["data"] = json.loads(line[6:])
            elif line == "" and event:
                out.append(event)
                event = {}
                if len(out) >= want:
                    return


def test_event_stream_is_live_and_resumable(sidecar: SidecarProcess, spawn_worker) -> None:
    received: list[dict[str, Any]] = []
    subscribed = threading.Event()
    reader = threading.Thread(
        target=read_sse,
        args=(sidecar.url + "/api/v1/events/stream", {}, 2, received, subscribed),
    )
    reader.start()
    assert subscribed.wait(10)
    worker = spawn_worker(rank=4)
    sidecar.wait_workers(1)
    worker.proc.kill()
    reader.join(15)
    assert [e["event"] for e in received] == ["worker_connected", "worker_disconnected"]
    assert received[0]["data"]["worker"] == "4"

    # A client that reconnects with Last-Event-ID gets what it missed first.
    resumed: list[dict[str, Any]] = []
    read_sse(
        sidecar.url + "/api/v1/events/stream",
        {"Last-Event-ID": str(received[0]["id"])},
        1,
        resumed,
    )
    assert resumed[0]["id"] == received[1]["id"]


def test_a_stream_resumed_across_a_sidecar_restart_misses_nothing(
    sidecar: SidecarProcess, spawn_worker
) -> None:
    """The old boot's Last-Event-ID is below every id of the new boot: its first events come."""
    spawn_worker(rank=0)
    spawn_worker(rank=1)
    sidecar.wait_workers(2)
    before = sidecar.client.get("/api/v1/events").json()["events"]
    last_id = max(e["id"] for e in before)
    assert sidecar.stop() == 0
    sidecar.start()
    sidecar.wait_workers(2)
    resumed: list[dict[str, Any]] = []
    read_sse(sidecar.url + "/api/v1/events/stream", {"Last-Event-ID": str(last_id)}, 2, resumed)
    assert sorted(e["data"]["worker"] for e in resumed if e["event"] == "worker_connected") == [
        "0",
        "1",
    ]
    since = sidecar.client.get("/api/v1/events", params={"since": last_id}).json()["events"]
    assert {e["worker"] for e in since if e["kind"] == "worker_connected"} == {"0", "1"}
