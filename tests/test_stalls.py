"""Stall detection and dumps, with real workers that stop making progress."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from conftest import SidecarProcess, wait_for

from sidecar.node.dumps import DumpStore


def events_of(sidecar: SidecarProcess, kind: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = sidecar.client.get("/api/v1/events").json()["events"]
    return [e for e in events if e["kind"] == kind]


def metric_value(sidecar: SidecarProcess, sample: str) -> float | None:
    for line in sidecar.client.get("/metrics").text.splitlines():
        if line.startswith(sample + " ") or line.startswith(sample + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_stalled_worker_is_flagged_dumped_and_resumes(
    sidecar_factory, spawn_worker, tmp_path: Path
) -> None:
    dump_dir = tmp_path / "dumps"
    side = sidecar_factory("--stall-after", "2", "--dump-dir", str(dump_dir))
    # Rank 1 stops stepping at step 20 for 4 s; rank 0 keeps going.
    spawn_worker("train_loop.py", rank=0)
    spawn_worker("staller.py", "sleep", "20", "4", rank=1)
    side.wait_workers(2)
    stalled_at = time.time()
    stalled = wait_for(lambda: events_of(side, "worker_stalled"), 10, what="a stall event")
    assert [e["worker"] for e in stalled] == ["1"]
    assert "no progress" in stalled[0]["data"]["reason"]
    assert side.worker("1")["stalled"] is True
    assert side.worker("0")["stalled"] is False
    assert 'rankside_worker_stalled{rank="1"' in side.client.get("/metrics").text

    # Every worker's stacks are captured, not only the stalled one's.
    def both_dumped() -> list[dict[str, Any]]:
        dumps: list[dict[str, Any]] = side.client.get("/api/v1/dumps").json()["dumps"]
        return dumps if {d["worker"] for d in dumps} == {"0", "1"} else []

    dumps = wait_for(both_dumped, 10, what="dumps of both workers")
    assert {d["what"] for d in dumps} == {"dump_traceback"}
    assert {d["incident"] for d in dumps} == {stalled[0]["data"]["incident"]}
    assert sorted(p.name for p in dump_dir.iterdir()) == sorted(d["id"] for d in dumps)
    # As private as the worker socket: stacks and locals are not for other users.
    assert dump_dir.stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in dump_dir.iterdir()} == {0o600}
    stalled_dump = next(d for d in dumps if d["worker"] == "1")
    text = side.client.get(f"/api/v1/dumps/{stalled_dump['id']}").text
    # faulthandler's format: the main thread sits in main() of the staller.
    assert "Thread 0x" in text
    assert 'staller.py", line 24 in main' in text

    # Progress resumes: the stall ends with an event and the metric drops.
    resumed = wait_for(lambda: events_of(side, "worker_resumed"), 10, what="a resume event")
    assert resumed[0]["worker"] == "1"
    assert resumed[0]["data"]["stalled_seconds"] >= 1
    assert side.worker("1")["stalled"] is False
    assert metric_value(side, "rankside_stalls_total") == 1
    assert metric_value(side, "rankside_dumps_total") == 2
    assert time.time() - stalled_at < 15


def test_worker_holding_the_gil_is_dumped_from_outside(
    sidecar_factory, spawn_worker, tmp_path: Path
) -> None:
    side = sidecar_factory(
        "--stall-after", "30",
        "--heartbeat-timeout", "1.5",
        "--dump-timeout", "1",
        "--dump-dir", str(tmp_path / "dumps"),
    )  # fmt: skip
    spawn_worker("staller.py", "gil", "10", "12", rank=0)
    spawn_worker("train_loop.py", "100000", rank=1)
    side.wait_workers(2)
    stalled = wait_for(lambda: events_of(side, "worker_stalled"), 10, what="a stall event")
    assert "no heartbeat" in stalled[0]["data"]["reason"]

    def outside_dump() -> list[dict[str, Any]]:
        dumps: list[dict[str, Any]] = side.client.get("/api/v1/dumps").json()["dumps"]
        kinds = {d["what"] for d in dumps}
        return (
            dumps
            if "dump_traceback_no_answer" in kinds and kinds & {"pyspy", "pyspy_failed"}
            else []
        )

    dumps = wait_for(outside_dump, 40, interval=0.2, what="a no-answer record and a py-spy dump")
    note = next(d for d in dumps if d["what"] == "dump_traceback_no_answer")
    assert (
        "did not answer dump_traceback within 1 s"
        in side.client.get(f"/api/v1/dumps/{note['id']}").text
    )
    pyspy = next(d for d in dumps if d["what"] in ("pyspy", "pyspy_failed"))
    stack = side.client.get(f"/api/v1/dumps/{pyspy['id']}").text
    # py-spy runs as root here and may attach: it shows where the worker is stuck.
    assert pyspy["what"] == "pyspy", stack
    assert "staller.py" in stack and "main" in stack

    # The verdict: the silent rank, from its heartbeats; its py-spy stack grouped apart.
    incident = wait_for(
        lambda: side.client.get("/api/v1/incidents").json()["incidents"],
        10,
        what="the incident's verdict",
    )[0]
    assert [(c["rank"], c["evidence"]) for c in incident["culprits"]] == [(0, "heartbeat")]
    assert "sent no heartbeat for" in incident["summary"], incident["summary"]
    groups = {tuple(g["ranks"]): g["label"] for g in incident["groups"]}
    assert "staller.py" in groups[(0,)], groups


def test_dump_store_caps_remove_oldest_first(tmp_path: Path) -> None:
    store = DumpStore(str(tmp_path), max_files=3, max_bytes=250)
    saved = []
    for i in range(5):
        saved.append(store.save(f"stall{i}", str(i), "dump_traceback", b"x" * 50, "text/plain"))
        time.sleep(0.002)
    assert [d.id for d in store.all()] == [d.id for d in reversed(saved[-3:])]
    store.save("big", "9", "dump_traceback", b"y" * 200, "text/plain")
    kept = store.all()
    assert sum(d.size for d in kept) <= 250
    assert kept[0].incident == "big"
    # Only names the store wrote are served: no traversal, no stray files.
    (tmp_path / "notes.txt").write_text("secret")
    assert store.path_of("../etc/passwd") is None
    assert store.path_of("notes.txt") is None
    assert store.path_of(kept[0].id) is not None


def test_dump_routes_reject_unknown_ids(sidecar: SidecarProcess) -> None:
    assert sidecar.client.get("/api/v1/dumps").json() == {"dumps": []}
    for bad in ("nope", "..%2F..%2Fetc%2Fpasswd", "20260101T000000.000Z-x-0-y.txt"):
        response = sidecar.client.get(f"/api/v1/dumps/{bad}")
        assert response.status_code == 404, bad
        assert "error" in response.json()
