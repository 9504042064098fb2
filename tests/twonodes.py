"""A gloo job on two simulated nodes: two torchrun agents, each beside its own sidecar.

Each sidecar has the other as its job target (``--target``) and a node name
(``node-a``, ``node-b``); four ranks, 0-1 on node a and 2-3 on node b, run
tests/workers/collective_job.py, whose HANG_FILE puts a fault into one rank.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from conftest import WORKERS, free_port, torchrun, torchrun_env, wait_for
from node import Node


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

    def workers_or_none(self, node: Node) -> list[dict[str, Any]]:
        """The workers ``node`` lists, or none when it does not answer (at teardown)."""
        try:
            listed: list[dict[str, Any]] = node.sidecar.client.get("/api/v1/workers").json()[
                "workers"
            ]
        except (httpx.HTTPError, ValueError, KeyError):
            return []
        return [w for w in listed if isinstance(w.get("pid"), int) and w["pid"] > 1]

    @property
    def targets(self) -> list[str]:
        """``--target URL`` for every node, as a command of the job's takes them."""
        return [arg for node in self.nodes for arg in ("--target", node.sidecar.url)]

    def workers(self, node: Node) -> dict[str, dict[str, Any]]:
        listed = node.sidecar.client.get("/api/v1/workers").json()["workers"]
        return {w["key"]: w for w in listed}

    def events(self, node: Node, kind: str) -> list[dict[str, Any]]:
        listed = node.sidecar.client.get("/api/v1/events", params={"limit": 500}).json()
        return [e for e in listed["events"] if e["kind"] == kind]


@contextmanager
def two_node_job(
    tmp_path: Path, *sidecar_args: str, env: dict[str, str] | None = None
) -> Iterator[Job]:
    """Two sidecars, each the other's job target, and a torchrun agent beside each."""
    nodes = []
    for name in ("a", "b"):
        directory = tmp_path / f"node-{name}"
        directory.mkdir()
        nodes.append(Node(directory))
    for node, name, other in ((nodes[0], "a", nodes[1]), (nodes[1], "b", nodes[0])):
        node.sidecar.args += [
            "--node-name", f"node-{name}", "--target", other.sidecar.url,
            "--heartbeat-timeout", "3", "--dump-timeout", "2", *sidecar_args,
        ]  # fmt: skip
        node.start()
    hang_file = tmp_path / "hang"
    port = free_port()
    agents, logs = [], []
    for index, node in enumerate(nodes):
        job_env = torchrun_env(
            RANKSIDE_SOCKET=node.socket_path, RANKSIDE_HEARTBEAT_INTERVAL="0.2", **(env or {})
        )
        log = tmp_path / f"torchrun-{index}.log"
        agents.append(
            subprocess.Popen(
                [*torchrun(), "--nnodes", "2", "--node-rank", str(index),
                 "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                 "--master-port", str(port), "--max-restarts", "0",
                 str(WORKERS / "collective_job.py"), str(hang_file)],
                env=job_env, cwd=tmp_path, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )  # fmt: skip
        logs.append(log)
    started = Job(nodes, agents, logs, hang_file)
    try:
        yield started
    finally:
        # torchrun starts its workers in process groups of their own: the pids
        # the sidecars saw are killed too, so that no rank outlives the test.
        pids = {w["pid"] for node in nodes for w in started.workers_or_none(node)}
        for agent in agents:
            if agent.poll() is None:
                # The whole session: a stopped rank must be killed, not waited on.
                os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
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
