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
from conftest import SidecarProcess, wait_for
from system_tools import require_module
from twonodes import Job, two_node_job, wait_until_training
from wire import RawPeer

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
        # Named once the median of the window crosses the 20 ms bar, which can
        # be halfway between collectives before and after the slowdown.
        assert lags[SLOW_RANK] >= 0.02 and all(abs(lags[r]) < 0.02 for r in (0, 1, 2)), lags

        # Once the window holds only slow steps, the lag is the 100 ms extra work.
        def settled() -> dict[int, float] | None:
            slow.check_running()
            lags = {r["rank"]: r["lag_seconds"] for r in job_stragglers(slow)["ranks"]}
            return lags if lags.get(SLOW_RANK, 0) > 0.07 else None

        lags = wait_for(settled, timeout=30, interval=1.0, what="the straggler's lag settled")
        assert lags.keys() == {0, 1, 2, 3} and lags[SLOW_RANK] < 0.2, lags
        assert all(abs(lags[r]) < 0.02 for r in (0, 1, 2)), lags
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


def test_arrivals_over_the_socket_name_the_late_rank_and_bad_ones_are_refused(
    sidecar: SidecarProcess,
) -> None:
    """Three ranks speak the protocol by hand: rank 2 enqueues every collective 80 ms after
    the others. A fourth sends arrivals that are not [seq, ns] pairs and is refused."""
    base = 1_800_000_000 * 10**9
    peers = [RawPeer(sidecar.socket_path) for _ in range(3)]
    for rank, peer in enumerate(peers):
        peer.hello(rank=rank)
        late = 80_000_000 if rank == 2 else rank * 1_000_000
        arrivals = {"0": [[seq, base + seq * 10**9 + late] for seq in range(1, 41)]}
        peer.send({"type": "heartbeat", "step": 1, "steps": 1, "progress_time": 1.0,
                   "arrivals": arrivals})  # fmt: skip
    answer = wait_for(
        lambda: (a := sidecar.client.get("/api/v1/stragglers").json())["stragglers"] and a,
        what="a straggler among the raw ranks",
    )
    assert [(s["rank"], round(s["lag_seconds"], 3)) for s in answer["stragglers"]] == [(2, 0.079)]
    assert {r["rank"]: r["samples"] for r in answer["ranks"]} == {0: 40, 1: 40, 2: 40}
    with_arrivals = sidecar.client.get("/api/v1/stragglers", params={"arrivals": "true"}).json()
    assert len(with_arrivals["arrivals"]) == 3
    assert sidecar.client.get("/api/v1/stragglers", params={"arrivals": "yes"}).status_code == 400

    bad = RawPeer(sidecar.socket_path)
    bad.hello(rank=3)
    bad.send({"type": "heartbeat", "step": 1, "steps": 1, "progress_time": 1.0,
              "arrivals": {"0": [[1, -5], [2]]}})  # fmt: skip
    rejected = wait_for(
        lambda: [
            e for e in sidecar.client.get("/api/v1/events").json()["events"]
            if e["kind"] == "frame_rejected"
        ],
        what="the bad arrivals refused",
    )  # fmt: skip
    assert "each arrival is [seq, time_created_ns]" in rejected[0]["message"]
    # The others are still weighed.
    assert len(sidecar.client.get("/api/v1/stragglers").json()["ranks"]) == 3
    for peer in [*peers, bad]:
        peer.sock.close()


def test_a_node_a_batch_ahead_still_shares_collectives_with_the_others(
    sidecar_factory: Any, tmp_path: Path
) -> None:
    """Asked just as the ranks send, a node may hold one rank's newest batch of
    arrivals and not yet another's. Node b's ranks sent collectives 1-200 (in two
    batches of 100, more than the 64 weighed), node a's only 1-100 yet: the job's
    answer still weighs all four ranks, over the 64 collectives they share."""
    base = 1_800_000_000 * 10**9
    node_b: SidecarProcess = sidecar_factory(socket_path=str(tmp_path / "b.sock"))
    node_a: SidecarProcess = sidecar_factory("--target", node_b.url)

    def ranks_of(sidecar: SidecarProcess, ranks: range, batches: int) -> list[RawPeer]:
        peers = []
        for rank in ranks:
            peer = RawPeer(sidecar.socket_path)
            peer.hello(rank=rank)
            for batch in range(batches):
                seqs = range(1 + 100 * batch, 101 + 100 * batch)
                arrivals = {"0": [[seq, base + seq * 10**9 + rank * 1_000_000] for seq in seqs]}
                peer.send({"type": "heartbeat", "step": 1, "steps": 1, "progress_time": 1.0,
                           "arrivals": arrivals})  # fmt: skip
            peers.append(peer)
        return peers

    peers = [*ranks_of(node_a, range(0, 2), batches=1), *ranks_of(node_b, range(2, 4), batches=2)]
    answer = wait_for(
        lambda: (a := node_a.client.get("/api/v1/job/stragglers").json())["ranks"]
        and len(a["ranks"]) == 4 and a,
        what="the job's four ranks weighed",
    )  # fmt: skip
    assert answer["unreachable_nodes"] == [], answer
    assert {r["rank"]: r["samples"] for r in answer["ranks"]} == {0: 64, 1: 64, 2: 64, 3: 64}
    served = node_b.client.get("/api/v1/stragglers", params={"arrivals": "true"}).json()
    seqs = sorted(seq for seq, _ in served["arrivals"][0]["arrivals"]["0"])
    assert seqs == [*range(37, 101), *range(137, 201)]
    for peer in peers:
        peer.sock.close()
