"""The worker's connection under the careless values training code passes, with real processes.

Each case once cost a worker its connection: a frame the sidecar refused (and
a reconnect every 60 ms), a connection thread dead for good, or one reply or
exit message that closed the whole connection. Real sidecar processes and
real worker processes (``tests/workers/careless_worker.py``) over real unix
sockets; the backoff case uses a plain socket server as a sidecar that
welcomes a worker and then refuses its frames.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from conftest import SidecarProcess, WorkerProcess, wait_for

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
