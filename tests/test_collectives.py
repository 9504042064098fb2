"""Collective progress from every rank: the flight recorder's positions ride each heartbeat.

A real gloo job under torchrun, three ranks, each connected to a real sidecar.
One rank is made to hang before an all_reduce; the others enter it. The
sidecar must then show the hung rank one sequence number behind in the
default group, every group with its real ranks (gloo's own table names them
all ``''``), and gloo's positions as the docs say: no ``started``. The
incident keeps every rank's flight-recorder dump, on which torch's own
analyzer (torchfrtrace) names the same rank, and says which op the others
wait in and where the program called it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import WORKERS, torchrun, torchrun_env, wait_for
from node import Node
from system_tools import require_module

LAG_INTERVAL = 2.0


def arrival_moves(node: Node, seconds: float) -> list[tuple[int, float]]:
    """For ``seconds``, when each rank's newest arrival in the default group moved."""
    newest: dict[int, int] = {}
    moves: list[tuple[int, float]] = []
    until = time.time() + seconds
    while time.time() < until:
        answer = node.sidecar.client.get("/api/v1/stragglers", params={"arrivals": "true"})
        at = time.time()
        for rank in answer.json()["arrivals"]:
            seq = max((s for s, _ in rank["arrivals"].get("0", [])), default=-1)
            if rank["rank"] in newest and seq != newest[rank["rank"]]:
                moves.append((rank["rank"], at))
            newest[rank["rank"]] = seq
        time.sleep(0.05)
    return moves


def test_heartbeats_carry_each_ranks_collective_position(tmp_path: Path) -> None:
    require_module("torch")
    dump_dir = tmp_path / "dumps"
    node = Node(tmp_path, "--stall-after", "2", "--dump-dir", str(dump_dir)).start()
    hang_file = tmp_path / "hang"
    env = torchrun_env(
        RANKSIDE_SOCKET=node.socket_path,
        RANKSIDE_HEARTBEAT_INTERVAL="0.2",
        RANKSIDE_LAG_INTERVAL=str(LAG_INTERVAL),
    )
    log_path = tmp_path / "torchrun.log"
    job = subprocess.Popen(
        [*torchrun(), "--standalone", "--nproc-per-node", "3",
         str(WORKERS / "collective_job.py"), str(hang_file)],
        env=env, cwd=tmp_path, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip

    def workers() -> dict[str, dict[str, Any]]:
        if job.poll() is not None:
            raise AssertionError(f"torchrun exited:\n{log_path.read_text()}")
        listed = node.sidecar.client.get("/api/v1/workers").json()["workers"]
        return {w["key"]: w for w in listed if w["state"] == "running"}

    try:
        running = wait_for(
            lambda: (
                (w := workers()).keys() == {"0", "1", "2"}
                and all(x["collectives"].get("0", {}).get("enqueued", -1) > 3 for x in w.values())
                and w
            ),
            timeout=60,
            interval=0.2,
            what="three ranks reporting collective progress",
        )
        for key, worker in running.items():
            default = worker["collectives"]["0"]
            assert default["ranks"] == [0, 1, 2], (key, default)
            # gloo marks collectives enqueued and completed, never started.
            assert default["started"] == -1, (key, default)
            assert default["completed"] <= default["enqueued"], (key, default)
        pairs = {k: w["collectives"] for k, w in running.items()}
        for key in ("0", "1"):
            pair = [g for g in pairs[key].values() if g["desc"] == "pair"]
            assert len(pair) == 1 and pair[0]["ranks"] == [0, 1], (key, pairs[key])
        assert not [g for g in pairs["2"].values() if g["desc"] == "pair"], pairs["2"]

        # Each rank answers with its flight recorder through the relay, the
        # group table rebuilt, and its newest collectives with their call
        # site once the symbolizer the worker warms (once torch.distributed is
        # up) is ready: until then the answers come without stack traces.
        client = node.sidecar.client

        def recent_of(rank: int) -> dict[str, Any] | None:
            reply = client.post(f"/api/v1/workers/{rank}/handlers/fr_recent?entries=2")
            assert reply.status_code == 200, reply.text
            answer: dict[str, Any] = reply.json()
            return answer if answer["stack_traces"] else None

        for rank in range(3):
            recent = wait_for(
                lambda rank=rank: recent_of(rank), 90, 0.5, what=f"rank {rank} warmed up"
            )
            default = recent["groups"]["0"]
            assert default["ranks"] == [0, 1, 2] and default["desc"] == "default_pg", recent
            assert [e["op"] for e in default["entries"]] == ["all_reduce"] * 2, recent
            assert default["entries"][0]["seq"] > default["entries"][1]["seq"], recent
            assert re.fullmatch(r"collective_job\.py:\d+", default["entries"][0]["site"]), recent
            reply = client.post(f"/api/v1/workers/{rank}/handlers/fr_trace_dump")
            assert reply.status_code == 200, reply.text
            assert reply.headers["content-type"] == "application/octet-stream"

        # Every rank sends its arrivals on the wall clock's multiples of the
        # interval, so each one's newest arrival moves just after them alone.
        moves = arrival_moves(node, seconds=3 * LAG_INTERVAL + 0.5)
        assert {rank for rank, _ in moves} == {0, 1, 2}, moves
        phases = [round(at % LAG_INTERVAL, 2) for _, at in moves]
        assert all(phase < 0.5 for phase in phases), phases

        hang_file.write_text("2")

        def positions() -> dict[str, int] | None:
            w = workers()
            enqueued = {k: x["collectives"]["0"]["enqueued"] for k, x in w.items()}
            # Settled: the two healthy ranks wait in one all_reduce rank 2 never joined.
            if enqueued["0"] == enqueued["1"] == enqueued["2"] + 1:
                return enqueued
            return None

        def stays() -> dict[str, int] | None:
            # Running ranks' heartbeats can show one rank one behind for a
            # moment; the hang is when it stays so for five heartbeats.
            first = positions()
            if first is None:
                return None
            time.sleep(1.0)
            return first if positions() == first else None

        # It stays so: the hung rank's last heartbeat is the evidence.
        settled = wait_for(stays, timeout=30, interval=0.2, what="rank 2 one behind, for good")
        final = workers()
        waiting = final["0"]["collectives"]["0"]
        assert waiting["completed"] == waiting["enqueued"] - 1, waiting
        hung = final["2"]["collectives"]["0"]
        assert hung["completed"] == hung["enqueued"], hung

        # The stall's incident names rank 2, from collective progress, and
        # groups the stacks: two ranks in the all_reduce, one asleep.
        incident = wait_for(
            lambda: next(
                (i for i in client.get("/api/v1/incidents").json()["incidents"] if i["culprits"]),
                None,
            ),
            timeout=20,
            interval=0.25,
            what="a stall incident with a verdict",
        )
        assert incident["kind"] == "stall" and incident["scope"] == "node", incident
        assert [c["rank"] for c in incident["culprits"]] == [2], incident
        culprit = incident["culprits"][0]
        assert culprit["evidence"] == "collective", culprit
        seq = settled["0"]
        # The op and the program's own call site, from the waiting ranks' recorders.
        wait = incident["waits"][0]
        assert wait["waiting"] == [0, 1] and wait["seq"] == seq, incident["waits"]
        assert wait["op"] == "all_reduce", wait
        assert re.fullmatch(r"collective_job\.py:\d+", wait["site"]), wait
        said = f"all_reduce #{seq} of group 0 (default_pg) called at {wait['site']}"
        assert said in culprit["reason"], culprit
        assert incident["summary"].startswith("rank 2 "), incident["summary"]
        assert said in incident["summary"], incident["summary"]
        groups = {tuple(g["ranks"]): g for g in incident["groups"]}
        assert set(groups) == {(0, 1), (2,)}, incident["groups"]
        assert groups[(0, 1)]["label"].startswith("all_reduce at collective_job.py:"), groups
        assert "collective_job.py" in groups[(2,)]["label"], groups
        # One stack dump and one flight-recorder dump per rank, the latter in
        # the incident's own directory under the names torchfrtrace reads.
        recorder_ids = {f"{incident['id']}-fr_trace_rank_{rank}" for rank in range(3)}
        assert len(incident["dumps"]) == 6, incident["dumps"]
        assert recorder_ids <= set(incident["dumps"]), incident["dumps"]
        incident_dir = dump_dir / incident["id"]
        files = {p.name for p in incident_dir.iterdir()}
        assert files == {f"fr_trace_rank_{rank}" for rank in range(3)}, files
        assert incident_dir.stat().st_mode & 0o777 == 0o700
        assert {p.stat().st_mode & 0o777 for p in incident_dir.iterdir()} == {0o600}
        served = client.get(f"/api/v1/dumps/{incident['id']}-fr_trace_rank_2")
        assert served.status_code == 200, served.text
        assert served.headers["content-type"] == "application/octet-stream"
        assert served.content == (incident_dir / "fr_trace_rank_2").read_bytes()
        listed = {d["id"]: d for d in client.get("/api/v1/dumps").json()["dumps"]}
        assert listed[f"{incident['id']}-fr_trace_rank_2"]["what"] == "fr_trace", listed

        # torch's analyzer runs on the incident directory as it is, and names
        # the rank rankside named, missing from the same all_reduce.
        analyzer = subprocess.run(
            [sys.executable, "-m", "torch.distributed.flight_recorder.fr_trace",
             str(incident_dir)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        said_by_torch = analyzer.stdout + analyzer.stderr
        assert analyzer.returncode == 0, said_by_torch
        assert f"Not all ranks joining collective, sequence number: {seq}" in said_by_torch, (
            said_by_torch
        )
        assert "missing ranks: {2}" in said_by_torch, said_by_torch
        assert "collective: gloo:all_reduce" in said_by_torch, said_by_torch
        assert client.get(f"/api/v1/incidents/{incident['id']}").json() == incident
        assert client.get("/api/v1/incidents/nope").status_code == 404
        scrape = client.get("/metrics").text
        assert 'rankside_incident_culprit{rank="2"} 1.0' in scrape, scrape[-2000:]

        # A diagnosis on demand reaches the same verdict.
        manual = client.post("/api/v1/diagnose", timeout=30).json()
        assert manual["kind"] == "manual", manual
        assert [c["rank"] for c in manual["culprits"]] == [2], manual

        # And so does the CLI, in words a person reads.
        cli = subprocess.run(
            [sys.executable, "-m", "sidecar", "diagnose", "--url", node.sidecar.url],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        lines = cli.stdout.splitlines()
        assert lines[0].startswith("rank 2 on "), cli.stdout
        assert "0-1: all_reduce at collective_job.py:" in cli.stdout, cli.stdout
    finally:
        job.kill()
        job.wait()
        subprocess.run(["pkill", "-f", str(hang_file)], check=False)
        node.close()
