"""Naming the culprit across a job: two torchrun agents, two sidecars, one verdict.

A real gloo job of four ranks on two simulated nodes (two torchrun agents on
this machine, ``--nnodes 2``), each node with its own sidecar that has the
other as its job target. One fault is put into rank 3, on node b; the verdict
is read from node a, which runs none of the faulty rank's processes, and must
name exactly rank 3 within 10 s of the first stall being flagged, and say
which collective the others wait in.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import WORKERS, free_port, torchrun, torchrun_env, wait_for
from node import Node
from system_tools import require_module

CULPRIT = 3
# Seconds from the first stall flagged (on either node) to the verdict on node a.
VERDICT_WITHIN = 10.0


@dataclass
class Job:
    nodes: list[Node]
    agents: list[subprocess.Popen[bytes]]
    logs: list[Path]
    hang_file: Path

    @property
    def node_a(self) -> Node:
        return self.nodes[0]

    def check_running(self) -> None:
        for agent, log in zip(self.agents, self.logs, strict=True):
            if agent.poll() is not None:
                raise AssertionError(f"torchrun exited early:\n{log.read_text()[-4000:]}")

    def workers(self, node: Node) -> dict[str, dict[str, Any]]:
        listed = node.sidecar.client.get("/api/v1/workers").json()["workers"]
        return {w["key"]: w for w in listed}

    def events(self, node: Node, kind: str) -> list[dict[str, Any]]:
        listed = node.sidecar.client.get("/api/v1/events", params={"limit": 500}).json()
        return [e for e in listed["events"] if e["kind"] == kind]


@pytest.fixture
def job(tmp_path: Path) -> Iterator[Job]:
    require_module("torch")
    nodes = []
    for name in ("a", "b"):
        directory = tmp_path / f"node-{name}"
        directory.mkdir()
        nodes.append(Node(directory))
    for node, name, other in ((nodes[0], "a", nodes[1]), (nodes[1], "b", nodes[0])):
        node.sidecar.args += [
            "--node-name", f"node-{name}", "--target", other.sidecar.url,
            "--stall-after", "2", "--heartbeat-timeout", "3", "--dump-timeout", "2",
        ]  # fmt: skip
        node.start()
    hang_file = tmp_path / "hang"
    port = free_port()
    agents, logs = [], []
    for index, node in enumerate(nodes):
        env = torchrun_env(RANKSIDE_SOCKET=node.socket_path, RANKSIDE_HEARTBEAT_INTERVAL="0.2")
        log = tmp_path / f"torchrun-{index}.log"
        agents.append(
            subprocess.Popen(
                [*torchrun(), "--nnodes", "2", "--node-rank", str(index),
                 "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                 "--master-port", str(port), "--max-restarts", "0",
                 str(WORKERS / "collective_job.py"), str(hang_file)],
                env=env, cwd=tmp_path, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )  # fmt: skip
        logs.append(log)
    started = Job(nodes, agents, logs, hang_file)
    try:
        yield started
    finally:
        for agent in agents:
            if agent.poll() is None:
                # The whole session: a stopped rank must be killed, not waited on.
                os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
        for node in nodes:
            node.close()


def wait_until_training(job: Job) -> None:
    def training() -> bool:
        job.check_running()
        ranks = {**job.workers(job.nodes[0]), **job.workers(job.nodes[1])}
        return ranks.keys() == {"0", "1", "2", "3"} and all(
            w["state"] == "running" and w["collectives"].get("0", {}).get("enqueued", -1) > 3
            for w in ranks.values()
        )

    wait_for(training, timeout=90, interval=0.2, what="four ranks on two nodes training")


def first_event(job: Job, kind: str, since: float) -> float:
    """When the first event of ``kind`` after ``since`` happened, on either node."""
    return min(e["time"] for n in job.nodes for e in job.events(n, kind) if e["time"] >= since)


def verdict_on_node_a(job: Job, kind: str, since: float) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        incidents = job.node_a.sidecar.client.get("/api/v1/incidents").json()["incidents"]
        return next(
            (
                i
                for i in incidents
                if i["kind"] == kind and i["scope"] == "job" and i["opened_at"] >= since - 1
            ),
            None,
        )

    incident: dict[str, Any] = wait_for(found, timeout=60, interval=0.1, what=f"a job {kind}")
    return incident


@pytest.mark.parametrize("fault", ["sleep", "queue", "gil", "sigstop"])
def test_a_hung_rank_on_one_node_is_named_from_the_other(job: Job, fault: str) -> None:
    wait_until_training(job)
    since = time.time()
    job.hang_file.write_text(f"{CULPRIT} {fault}")
    incident = verdict_on_node_a(job, "stall", since)
    flagged = first_event(job, "worker_stalled", since)
    # The verdict is kept on node a whichever node reached it.
    verdicts = [e for n in job.nodes for e in job.events(n, "incident_verdict")]
    decided = min(e["time"] for e in verdicts if e["data"].get("incident") == incident["id"])
    print(f"{fault}: stall flagged {flagged - since:.1f} s after the fault, "
          f"verdict {decided - flagged:.1f} s after the stall")  # fmt: skip
    assert decided - flagged <= VERDICT_WITHIN, (decided - flagged, incident["summary"])
    assert [(c["rank"], c["node"]) for c in incident["culprits"]] == [(CULPRIT, "node-b")], (
        incident["summary"]
    )
    assert incident["culprits"][0]["evidence"] == "collective", incident["culprits"]
    waits = {w["group"]: w for w in incident["waits"]}
    assert waits["0"]["missing"] == [CULPRIT] and waits["0"]["waiting"] == [0, 1, 2], waits
    assert f"rank {CULPRIT} on node-b" in incident["summary"]
    assert {n["node"] for n in incident["nodes"] if n["ok"]} == {"node-a", "node-b"}
    assert sorted(v["rank"] for v in incident["ranks"]) == [0, 1, 2, 3]
    # Both nodes keep the same verdict, under the same id.
    on_b = job.nodes[1].sidecar.client.get(f"/api/v1/incidents/{incident['id']}").json()
    assert on_b["scope"] == "job" and on_b["culprits"] == incident["culprits"]
    groups = {tuple(g["ranks"]): g["label"] for g in incident["groups"]}
    assert any(CULPRIT not in ranks and {0, 1, 2} <= set(ranks) for ranks in groups), groups


def test_a_rank_that_returns_early_is_named_not_the_ranks_that_failed_after_it(
    job: Job,
) -> None:
    wait_until_training(job)
    since = time.time()
    job.hang_file.write_text(f"{CULPRIT} exit")
    incident = verdict_on_node_a(job, "failure", since)
    ended = first_event(job, "worker_exited", since)
    print(f"exit: failure verdict {incident['opened_at'] - ended:.1f} s after the first end")
    assert [(c["rank"], c["node"]) for c in incident["culprits"]] == [(CULPRIT, "node-b")], (
        incident["summary"]
    )
    assert "ended first: exited (code 0)" in incident["culprits"][0]["reason"]
    assert set(incident["followers"]) <= {0, 1, 2} and incident["followers"], incident
    on_b = job.nodes[1].sidecar.client.get(f"/api/v1/incidents/{incident['id']}").json()
    assert on_b["culprits"] == incident["culprits"]
