"""Slow job-wide calls occupy no thread the node needs for ingestion and dumps.

The load that once starved a sidecar: with job targets, 8 concurrent
``POST /api/v1/job/workers/0/handlers/sleep?seconds=25&timeout=30`` while the
local worker pushes 1,000 series every second. The sidecar then marked that
healthy worker stalled ("no heartbeat"), opened an incident, and took 24 s to
list its dumps, because the job calls filled asyncio's default thread pool,
which payload decoding and dump writes shared. Now the job routes await
httpx without threads; this keeps it so.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
from conftest import SidecarProcess, wait_for

CALLS = 8


def test_slow_job_calls_leave_ingestion_and_dumps_alone(
    sidecar_factory: Any, spawn_worker: Any, tmp_path: Path
) -> None:
    peer: SidecarProcess = sidecar_factory(socket_path=str(tmp_path / "peer.sock"))
    node: SidecarProcess = sidecar_factory("--heartbeat-timeout", "3", start=False)
    node.args += ["--target", node.url, "--target", peer.url]
    node.start()
    spawn_worker("busy_series_worker.py", rank=0)
    wait_for(
        lambda: "shard_items_total" in node.client.get("/metrics").text,
        20,
        what="the worker's 1,000 series",
    )
    statuses: list[int] = []

    def call() -> None:
        with httpx.Client(base_url=node.url, timeout=60) as client:
            response = client.post(
                "/api/v1/job/workers/0/handlers/sleep", params={"seconds": 25, "timeout": 30}
            )
            statuses.append(response.status_code)

    callers = [threading.Thread(target=call) for _ in range(CALLS)]
    for caller in callers:
        caller.start()
    slowest = {"dumps": 0.0, "metrics": 0.0}
    while any(caller.is_alive() for caller in callers):
        for path, name in (("/api/v1/dumps", "dumps"), ("/metrics", "metrics")):
            started = time.monotonic()
            assert node.client.get(path).status_code == 200
            slowest[name] = max(slowest[name], time.monotonic() - started)
        worker = node.worker("0")
        assert worker is not None and not worker["stalled"], worker
        time.sleep(0.5)
    for caller in callers:
        caller.join()
    assert node.client.get("/api/v1/incidents").json()["incidents"] == []
    assert slowest["dumps"] < 1.0 and slowest["metrics"] < 2.0, slowest
    # Four handler threads in the worker: four sleeps answer, the rest time out.
    assert statuses.count(200) >= 4 and set(statuses) <= {200, 504}, statuses
