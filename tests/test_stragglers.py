"""Stragglers across a job: a rank 3x slower per step is named; a healthy job names none.

Two gloo jobs under torchrun at once, each on two simulated nodes
(tests/twonodes.py): in one, rank 3 (node b) takes three times as long per
step; the other is healthy. Step time cannot tell (every rank waits for the
slow one in each all_reduce), arrival lag can: the slow job must name rank 3
a straggler within 2 minutes, from node a, and the healthy job, run for 2
minutes, must name no straggler and no culprit.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from system_tools import require_module
from twonodes import Job, two_node_job, wait_until_training

SLOW_RANK = 3
WITHIN = 120.0
HEALTHY_FOR = 120.0
# Arrivals every 5 s rather than 30: the test needs samples, not the production cadence.
ENV = {"RANKSIDE_LAG_INTERVAL": "5"}


def job_stragglers(job: Job) -> dict[str, Any]:
    answer: dict[str, Any] = job.node_a.sidecar.client.get("/api/v1/job/stragglers").json()
    return answer


# The healthy job must run its two minutes, after both jobs start.
@pytest.mark.timeout(HEALTHY_FOR + 180)
def test_a_slow_rank_is_named_a_straggler_and_a_healthy_job_names_none(tmp_path: Path) -> None:
    require_module("torch")
    (tmp_path / "slow").mkdir()
    (tmp_path / "healthy").mkdir()
    with (
        two_node_job(tmp_path / "slow", env=ENV) as slow,
        two_node_job(tmp_path / "healthy", env=ENV) as healthy,
    ):
        wait_until_training(slow)
        wait_until_training(healthy)
        started = time.time()
        slow.hang_file.write_text(f"{SLOW_RANK} slow")

        def named() -> dict[str, Any] | None:
            slow.check_running()
            answer = job_stragglers(slow)
            return answer if answer["stragglers"] else None

        answer = wait_for(named, timeout=WITHIN, interval=1.0, what="a straggler named")
        print(f"straggler named {time.time() - started:.0f} s after the slowdown")
        assert [(s["rank"], s["node"]) for s in answer["stragglers"]] == [(SLOW_RANK, "node-b")]
        lags = {r["rank"]: r["lag_seconds"] for r in answer["ranks"]}
        assert lags.keys() == {0, 1, 2, 3}, answer
        assert lags[SLOW_RANK] > 0.05 and all(abs(lags[r]) < 0.02 for r in (0, 1, 2)), lags
        # Node b runs the straggler: its incident, its gauge.
        node_b = slow.nodes[1].sidecar.client
        incident = wait_for(
            lambda: next(
                (i for i in node_b.get("/api/v1/incidents").json()["incidents"]
                 if i["kind"] == "straggler"),
                None,
            ),
            timeout=30, what="the straggler incident on node b",
        )  # fmt: skip
        assert [(c["rank"], c["evidence"]) for c in incident["culprits"]] == [(SLOW_RANK, "lag")]
        assert "arrives" in incident["summary"]
        metrics = node_b.get("/metrics").text
        assert f'rankside_worker_collective_lag_seconds{{rank="{SLOW_RANK}"' in metrics
        assert slow.events(slow.nodes[1], "worker_straggler"), "no straggler event"

        # The healthy job: two minutes in all, no straggler, no culprit, on either node.
        while time.time() - started < HEALTHY_FOR:
            healthy.check_running()
            assert job_stragglers(healthy)["stragglers"] == []
            time.sleep(5)
        answer = job_stragglers(healthy)
        assert answer["stragglers"] == [] and len(answer["ranks"]) == 4, answer
        assert max(abs(r["lag_seconds"]) for r in answer["ranks"]) < 0.02, answer
        for node in healthy.nodes:
            incidents = node.sidecar.client.get("/api/v1/incidents").json()["incidents"]
            assert incidents == [], incidents
