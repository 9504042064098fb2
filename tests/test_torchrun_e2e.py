"""The real thing, end to end: torchrun, gloo DDP, rankside run and a Prometheus server.

``rankside run`` starts the sidecar around ``torchrun --nproc-per-node 4`` of a
small DDP training script; a real Prometheus scrapes the sidecar every second.
The test reads per-rank series back through PromQL, fans a ``dump_traceback``
out to every rank, SIGKILLs one rank and watches torchrun's restart arrive in
``rankside_worker_restarts_total`` and in the event log, then stops training
and expects everything to end cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, WORKERS, free_port, torchrun, torchrun_env, wait_for
from system_tools import require_module, require_tool

RULES = ROOT / "deploy" / "prometheus" / "rules" / "rankside-alerts.yml"
RANKS = {"0", "1", "2", "3"}


class Prometheus:
    def __init__(self, tmp_path: Path, target_port: int) -> None:
        binary = require_tool("prometheus")
        self.port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  evaluation_interval: 1s\n"
            f"rule_files: [{str(RULES)!r}]\n"
            "scrape_configs:\n"
            "  - job_name: rankside\n"
            "    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n"
        )
        self.log_path = tmp_path / "prometheus.log"
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def query(self, promql: str) -> list[dict[str, Any]]:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log_path.read_text()}")
        response = self.client.get("/api/v1/query", params={"query": promql})
        if response.status_code == 503:  # still starting
            return []
        body = response.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def by_rank(self, promql: str) -> dict[str, float]:
        return {r["metric"]["rank"]: float(r["value"][1]) for r in self.query(promql)}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def make(target_port: int) -> Prometheus:
        started.append(Prometheus(tmp_path, target_port))
        return started[-1]

    yield make
    for server in started:
        server.close()


def test_torchrun_ddp_under_rankside_run(tmp_path: Path, prometheus_factory: Any) -> None:
    require_module("torch")
    port = free_port()
    prometheus: Prometheus = prometheus_factory(port)
    stop_file = tmp_path / "stop"
    env = torchrun_env(
        # torch 2.13's torchrun hands restarted workers the rendezvous store of
        # the first attempt, where gloo then finds the old workers' addresses;
        # a store of their own per attempt lets the restarted group connect.
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
    )
    log_path = tmp_path / "run.log"
    run = subprocess.Popen(
        [
            sys.executable, "-m", "sidecar", "run",
            "--listen", f"127.0.0.1:{port}",
            "--socket", str(tmp_path / "rankside.sock"),
            "--",
            *torchrun(),
            "--standalone", "--nproc-per-node", "4", "--max-restarts", "1",
            "--monitor-interval", "0.1",
            str(WORKERS / "ddp_train.py"), str(stop_file), "1000",
        ],
        env=env,
        cwd=tmp_path,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    sidecar = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

    def workers(state: str = "running") -> dict[str, dict[str, Any]]:
        if run.poll() is not None:
            raise AssertionError(f"rankside run exited:\n{log_path.read_text()}")
        listed = sidecar.get("/api/v1/workers").json()["workers"]
        return {w["key"]: w for w in listed if w["state"] == state}

    try:
        # Four ranks of torchrun's first worker group, stepping.
        first = wait_for(
            lambda: (w := workers()).keys() == RANKS and all(x["step"] for x in w.values()) and w,
            timeout=60,
            interval=0.2,
            what="4 running ranks",
        )
        assert {w["restart_count"] for w in first.values()} == {0}
        assert {w["world_size"] for w in first.values()} == {4}

        # Per-rank series, through Prometheus.
        steps = wait_for(
            lambda: (
                (s := prometheus.by_rank('rankside_worker_step{job="rankside"}')).keys() == RANKS
                and all(v > 0 for v in s.values())
                and s
            ),
            timeout=20,
            interval=0.25,
            what="rankside_worker_step of every rank in Prometheus",
        )
        assert len(steps) == 4
        assert prometheus.by_rank('rankside_worker_up{job="rankside"} == 1').keys() == RANKS
        # Counted before each step() but pushed apart from the heartbeat that
        # carries the step, a second later at most: wait for the value too.
        samples = wait_for(
            lambda: (
                (s := prometheus.by_rank("samples_processed_total")).keys() == RANKS
                and all(v >= 64 for v in s.values())
                and s
            ),
            timeout=10,
            interval=0.25,
            what="the script's own counter in Prometheus, a batch or more on every rank",
        )
        assert all(v % 64 == 0 for v in samples.values()), samples
        assert prometheus.by_rank("rankside_worker_step_duration_seconds_count > 0").keys() == RANKS

        # Every rank's stack, in one call.
        response = sidecar.post("/api/v1/handlers/dump_traceback", params={"timeout": 10})
        assert response.status_code == 200, response.text
        dump = response.json()
        assert dump["ranks"].keys() == RANKS
        for rank, result in dump["ranks"].items():
            assert result["status"] == 200, (rank, result)
            assert "ddp_train.py" in result["body"], (rank, result["body"])
            assert "line " in result["body"] and "in main" in result["body"]

        # One rank dies; torchrun restarts the worker group once.
        killed = first["2"]
        os.kill(killed["pid"], signal.SIGKILL)
        second = wait_for(
            lambda: (
                (w := workers()).keys() == RANKS
                and {x["restart_count"] for x in w.values()} == {1}
                and all(x["step"] for x in w.values())
                and w
            ),
            timeout=60,
            interval=0.2,
            what="torchrun's restarted worker group",
        )
        assert killed["pid"] not in {w["pid"] for w in second.values()}
        restarts = wait_for(
            lambda: (
                (r := prometheus.by_rank('rankside_worker_restarts_total{job="rankside"}')).keys()
                == RANKS
                and all(v == 1 for v in r.values())
                and r
            ),
            timeout=15,
            interval=0.25,
            what="rankside_worker_restarts_total == 1 for every rank in Prometheus",
        )
        assert len(restarts) == 4
        increase = prometheus.query("max(increase(rankside_worker_restarts_total[1m])) > 0")
        assert increase, "the restart shows as an increase of the counter"

        events = sidecar.get("/api/v1/events").json()["events"]
        kinds = [(e["kind"], e["worker"]) for e in events]
        assert ("worker_disconnected", "2") in kinds, kinds
        restarted = {e["worker"] for e in events if e["kind"] == "worker_restarted"}
        assert restarted == RANKS, kinds

        # Training stops at a step every rank agrees on; everything ends cleanly.
        stop_file.touch()
        assert run.wait(60) == 0, log_path.read_text()
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGTERM)
            try:
                run.wait(20)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait()
        sidecar.close()
