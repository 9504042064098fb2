"""Naming the culprit across a job: two torchrun agents, two sidecars, one verdict.

A real gloo job of four ranks on two simulated nodes (two torchrun agents on
this machine, ``--nnodes 2``), each node with its own sidecar that has the
other as its job target. One fault is put into rank 3, on node b; the verdict
is read from node a, which runs none of the faulty rank's processes, and must
name exactly rank 3 within 10 s of the first stall being flagged, and say
which collective the others wait in.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import torchrun_env, wait_for
from system_tools import require_module
from twonodes import Job, two_node_job, wait_until_training

CULPRIT = 3
# Seconds from the first stall flagged (on either node) to the verdict on node a.
VERDICT_WITHIN = 10.0


@pytest.fixture
def job(tmp_path: Path) -> Iterator[Job]:
    require_module("torch")
    with two_node_job(tmp_path, "--stall-after", "2") as started:
        yield started


def inject(job: Job, fault: str, kind: str) -> tuple[float, dict[str, Any]]:
    """Once the job trains, put ``fault`` into the culprit; when, and the job's incident."""
    wait_until_training(job)
    since = time.time()
    job.hang_file.write_text(f"{CULPRIT} {fault}")
    return since, verdict_on_node_a(job, kind, since)


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
def test_a_hung_rank_on_one_node_is_named_from_the_other(
    job: Job, fault: str, tmp_path: Path
) -> None:
    since, incident = inject(job, fault, "stall")
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
    # The node that decided keeps every rank's evidence; the others, the verdict.
    decider = job.nodes["ab".index(incident["node"][-1])]
    full = decider.sidecar.client.get(f"/api/v1/incidents/{incident['id']}").json()
    assert sorted(v["rank"] for v in full["ranks"]) == [0, 1, 2, 3]
    assert sorted(full["collectives"]) == ["0", "1", "2", "3"]
    # Both nodes keep the same verdict, under the same id.
    on_b = job.nodes[1].sidecar.client.get(f"/api/v1/incidents/{incident['id']}").json()
    assert on_b["scope"] == "job" and on_b["culprits"] == incident["culprits"]
    groups = {tuple(g["ranks"]): g["label"] for g in incident["groups"]}
    assert any(CULPRIT not in ranks and {0, 1, 2} <= set(ranks) for ranks in groups), groups
    if fault == "sleep":
        check_recorder_gathered(job, incident, tmp_path)
        check_manual_job_diagnosis(job)


def check_recorder_gathered(job: Job, incident: dict[str, Any], tmp_path: Path) -> None:
    """Each node kept its own ranks' recorder files; gathered, torch's analyzer names rank 3."""
    into = tmp_path / "recorder"
    gathered = subprocess.run(
        [sys.executable, "-m", "sidecar", "dumps", "--recorder", incident["id"],
         "--into", str(into), *job.targets],
        capture_output=True, text=True, timeout=60, env=torchrun_env(),
    )  # fmt: skip
    assert gathered.returncode == 0, gathered.stderr
    assert sorted(p.name for p in into.iterdir()) == [f"fr_trace_rank_{r}" for r in range(4)]
    analyzer = subprocess.run(
        [sys.executable, "-m", "torch.distributed.flight_recorder.fr_trace", str(into)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    said_by_torch = analyzer.stdout + analyzer.stderr
    assert analyzer.returncode == 0, said_by_torch
    assert f"missing ranks: {{{CULPRIT}}}" in said_by_torch, said_by_torch
    seq = next(w["seq"] for w in incident["waits"] if w["group"] == "0")
    assert f"Not all ranks joining collective, sequence number: {seq}" in said_by_torch


def test_a_rank_that_returns_early_is_named_not_the_ranks_that_failed_after_it(
    job: Job,
) -> None:
    since, incident = inject(job, "exit", "failure")
    ended = first_event(job, "worker_exited", since)
    print(f"exit: failure verdict {incident['opened_at'] - ended:.1f} s after the first end")
    assert [(c["rank"], c["node"]) for c in incident["culprits"]] == [(CULPRIT, "node-b")], (
        incident["summary"]
    )
    assert "ended first: exited (code 0)" in incident["culprits"][0]["reason"]
    assert set(incident["followers"]) <= {0, 1, 2} and incident["followers"], incident
    on_b = job.nodes[1].sidecar.client.get(f"/api/v1/incidents/{incident['id']}").json()
    assert on_b["culprits"] == incident["culprits"]


def check_manual_job_diagnosis(job: Job) -> None:
    """By hand, through node a's job route and through the command line: the same verdict."""
    manual = job.node_a.sidecar.client.post("/api/v1/job/diagnose", timeout=60).json()
    assert manual["kind"] == "manual" and manual["scope"] == "job", manual
    assert [c["rank"] for c in manual["culprits"]] == [CULPRIT], manual["summary"]
    cli = subprocess.run(
        [sys.executable, "-m", "sidecar", "diagnose", *job.targets],
        capture_output=True, text=True, timeout=120, env=torchrun_env(),
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert f"culprit: rank {CULPRIT} on node-b (collective)" in cli.stdout, cli.stdout
    incident_id = cli.stdout.rsplit("incident ", 1)[1].split(":")[0]
    for node in job.nodes:
        kept = node.sidecar.client.get(f"/api/v1/incidents/{incident_id}").json()
        assert kept["scope"] == "job" and [c["rank"] for c in kept["culprits"]] == [CULPRIT]
