"""Soak: many real workers pushing many series while scrapes and control calls run.

One sidecar process and WORKERS real worker processes (``bench/soak_worker.py``),
each with SERIES metric series that all change every second and are pushed
every second. Meanwhile a Prometheus-like scraper fetches ``/metrics`` every
second (gzip, as Prometheus asks for it) and a control client calls in a
loop: ``ping`` on one rank, ``ping`` fanned out to every rank,
``dump_traceback`` on one rank, the worker list and the event log.

Measured: the sidecar's resident memory and open file descriptors from
``/proc`` every few seconds, scrape and relay latency percentiles, and every
call that failed. At the end every worker is stopped with SIGTERM and writes
down what it counted itself; the sidecar's ``/metrics`` must show exactly
that for every series (nothing lost, nothing counted twice), and the step
count of every worker must match.

    .venv/bin/python bench/soak.py --duration 600            # the 10-minute soak
    .venv/bin/python bench/soak.py --duration 60 --workers 16 --json out.json

tests/test_soak.py runs a short version of the same code in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "soak_worker.py"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class SoakConfig:
    workers: int = 64
    series: int = 1000
    duration: float = 600.0
    warmup: float = 30.0
    scrape_interval: float = 1.0
    sample_interval: float = 5.0
    # Pause between two control calls: a loop, not a flood.
    control_pause: float = 0.05
    directory: str | None = None


@dataclass
class Latencies:
    samples: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def timed(
        self,
        kind: str,
        call: Callable[[], httpx.Response],
        check: Callable[[httpx.Response], str | None] | None = None,
    ) -> None:
        start = time.perf_counter()
        try:
            response = call()
        except httpx.HTTPError as exc:
            with self.lock:
                self.failures.append(f"{kind}: {type(exc).__name__}: {exc}")
            return
        elapsed = time.perf_counter() - start
        problem = None
        if response.status_code != 200:
            problem = f"status {response.status_code}: {response.text[:200]}"
        elif check is not None:
            problem = check(response)
        with self.lock:
            self.samples[kind].append(elapsed)
            if problem is not None:
                self.failures.append(f"{kind}: {problem}")


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "count": len(ordered),
        "p50_ms": at(0.50),
        "p95_ms": at(0.95),
        "p99_ms": at(0.99),
        "max_ms": ordered[-1] * 1000,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def proc_sample(pid: int) -> dict[str, float]:
    """Resident memory, open file descriptors and CPU seconds of ``pid``, from /proc."""
    rss = 0
    with open(f"/proc/{pid}/status") as fp:
        for line in fp:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    with open(f"/proc/{pid}/stat") as fp:
        fields = fp.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    return {
        "time": time.time(),
        "rss_bytes": rss,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "cpu_seconds": cpu,
    }


def wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"soak: timed out waiting for {what}: {last!r}")


def parse_samples(text: str, names: set[str]) -> list[tuple[str, dict[str, str], float]]:
    found = []
    for line in text.splitlines():
        if not line.startswith(tuple(names)):
            continue
        match = _SAMPLE.match(line)
        if match and match.group(1) in names:
            labels = dict(_LABEL.findall(match.group(2)))
            found.append((match.group(1), labels, float(match.group(3))))
    return found


class Soak:
    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if config.directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="rankside-soak-")
            self.directory = Path(self._tmp.name)
        else:
            self.directory = Path(config.directory)
            self.directory.mkdir(parents=True, exist_ok=True)
        self.socket_path = str(self.directory / "rankside.sock")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sidecar: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.stop = threading.Event()
        self.latencies = Latencies()
        self.samples: list[dict[str, float]] = []
        self.scrape_bytes: list[int] = []
        self.workers_cpu: list[float] = []
        self.loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)

    # -- processes ------------------------------------------------------------------

    def start(self) -> None:
        log = (self.directory / "sidecar.log").open("wb")
        self.sidecar = subprocess.Popen(
            [
                sys.executable, "-m", "sidecar", "serve",
                "--socket", self.socket_path,
                "--listen", f"127.0.0.1:{self.port}",
                # Ended workers stay listed, and their series exposed, for the check.
                "--grace", "3600",
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        with httpx.Client(base_url=self.url, timeout=5) as client:
            wait(lambda: client.get("/readyz").status_code == 200, 30, "the sidecar")
        n = self.config.workers
        for rank in range(n):
            env = {
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "RANKSIDE_SOCKET": self.socket_path,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(n),
                "LOCAL_WORLD_SIZE": str(n),
                "RANKSIDE_FLUSH_INTERVAL": "1",
            }
            worker_log = (self.directory / f"worker-{rank}.log").open("wb")
            self.workers.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), str(self.config.series), self.totals(rank)],
                    env=env,
                    stdout=worker_log,
                    stderr=subprocess.STDOUT,
                )
            )
        with httpx.Client(base_url=self.url, timeout=30) as client:
            wait(
                lambda: (
                    sum(
                        w["state"] == "running"
                        for w in client.get("/api/v1/workers").json()["workers"]
                    )
                    == n
                ),
                60,
                f"{n} running workers",
            )

            def all_pushed() -> bool:
                text = client.get("/metrics").text
                ranks = {labels.get("rank") for _, labels, _ in parse_samples(text, {"soak_level"})}
                return len(ranks) == n

            wait(all_pushed, 60, "every worker's series in /metrics")

    def totals(self, rank: int) -> str:
        return str(self.directory / f"totals-{rank}.json")

    def close(self) -> None:
        for proc in [*self.workers, self.sidecar]:
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- load -------------------------------------------------------------------------

    def scraper(self) -> None:
        headers = {"Accept": "text/plain;version=0.0.4", "Accept-Encoding": "gzip"}
        with httpx.Client(base_url=self.url, timeout=30, headers=headers) as client:
            next_scrape = time.monotonic()
            while not self.stop.is_set():

                def check(response: httpx.Response) -> str | None:
                    self.scrape_bytes.append(int(response.headers.get("content-length", 0)))
                    return None if "soak_events_total" in response.text else "no soak series"

                self.latencies.timed("scrape", lambda: client.get("/metrics"), check)
                next_scrape += self.config.scrape_interval
                self.stop.wait(max(0.0, next_scrape - time.monotonic()))

    def controller(self) -> None:
        n = self.config.workers
        rng = random.Random(8)

        def fan_out_ok(response: httpx.Response) -> str | None:
            summary = response.json()["summary"]
            return None if summary["ok"] == n else f"fan-out answered {summary}"

        def pong(response: httpx.Response) -> str | None:
            return None if response.text == "pong" else f"ping answered {response.text[:100]!r}"

        def listed(response: httpx.Response) -> str | None:
            running = sum(w["state"] == "running" for w in response.json()["workers"])
            return None if running == n else f"{running} of {n} workers running"

        calls: list[tuple[str, Callable[[httpx.Client], httpx.Response], Any]] = [
            (
                "relay_ping",
                lambda c: c.post(f"/api/v1/workers/{rng.randrange(n)}/handlers/ping"),
                pong,
            ),
            ("workers", lambda c: c.get("/api/v1/workers"), listed),
            ("relay_ping", lambda c: c.post(f"/workers/{rng.randrange(n)}/handler/ping"), pong),
            ("fanout_ping", lambda c: c.post("/api/v1/handlers/ping"), fan_out_ok),
            (
                "relay_ping",
                lambda c: c.post(f"/api/v1/workers/{rng.randrange(n)}/handlers/ping"),
                pong,
            ),
            ("events", lambda c: c.get("/api/v1/events?limit=50"), None),
            (
                "dump_traceback",
                lambda c: c.post(f"/api/v1/workers/{rng.randrange(n)}/handlers/dump_traceback"),
                None,
            ),
        ]
        with httpx.Client(base_url=self.url, timeout=30) as client:
            i = 0
            while not self.stop.is_set():
                kind, call, check = calls[i % len(calls)]
                self.latencies.timed(kind, lambda call=call: call(client), check)
                i += 1
                self.stop.wait(self.config.control_pause)

    def workers_cpu_seconds(self) -> float:
        return sum(proc_sample(p.pid)["cpu_seconds"] for p in self.workers)

    def sampler(self) -> None:
        assert self.sidecar is not None
        while not self.stop.is_set():
            self.samples.append(proc_sample(self.sidecar.pid))
            self.stop.wait(self.config.sample_interval)

    # -- the check at the end -----------------------------------------------------------

    def stop_workers_and_verify(self) -> dict[str, Any]:
        for proc in self.workers:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(60) for proc in self.workers]
        n = self.config.workers
        with httpx.Client(base_url=self.url, timeout=60) as client:
            wait(
                lambda: (
                    sum(
                        w["state"] == "exited"
                        for w in client.get("/api/v1/workers").json()["workers"]
                    )
                    == n
                ),
                30,
                "every worker exited",
            )
            workers = {w["key"]: w for w in client.get("/api/v1/workers").json()["workers"]}
            text = client.get("/metrics").text
            events = client.get("/api/v1/events?limit=100000").json()["events"]
        exposed: dict[tuple[str, str, str], float] = {}
        for name, labels, value in parse_samples(
            text,
            {"soak_events_total", "soak_latency_seconds_count", "rankside_frames_rejected_total"},
        ):
            exposed[
                (name, labels.get("rank", ""), labels.get("shard", labels.get("reason", "")))
            ] = value
        lost = double = steps_wrong = 0
        mismatches: list[str] = []
        for rank in range(n):
            totals = json.loads(Path(self.totals(rank)).read_text())
            expected = [("soak_events_total", i, v) for i, v in enumerate(totals["events"])]
            expected += [
                ("soak_latency_seconds_count", i, v) for i, v in enumerate(totals["observed"])
            ]
            for name, shard, want in expected:
                got = exposed.get((name, str(rank), str(shard)), 0.0)
                if got < want:
                    lost += 1
                elif got > want:
                    double += 1
                if got != want and len(mismatches) < 10:
                    mismatches.append(f"rank {rank} {name} shard {shard}: {got} != {want}")
            if workers[str(rank)]["steps"] != totals["steps"]:
                steps_wrong += 1
                mismatches.append(
                    f"rank {rank} steps {workers[str(rank)]['steps']} != {totals['steps']}"
                )
        rejected = sum(
            v for (name, _, _), v in exposed.items() if name == "rankside_frames_rejected_total"
        )
        unexpected_events = [
            e["message"] for e in events
            if e["kind"] not in ("worker_connected", "worker_exited")
        ]  # fmt: skip
        log = (self.directory / "sidecar.log").read_text(errors="replace")
        return {
            "worker_exit_codes_nonzero": sum(1 for c in codes if c != 0),
            "series_checked": n * (len(totals["events"]) + len(totals["observed"])),
            "series_lost": lost,
            "series_double_counted": double,
            "workers_with_wrong_steps": steps_wrong,
            "mismatches": mismatches,
            "frames_rejected": rejected,
            "unexpected_events": unexpected_events[:20],
            "tracebacks_in_log": log.count("Traceback"),
        }

    # -- the run ----------------------------------------------------------------------------

    def run(self, progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
        config = self.config
        started = time.monotonic()
        self.start()
        progress(
            f"{config.workers} workers x {config.series} series connected "
            f"in {time.monotonic() - started:.1f} s; soaking for {config.duration:g} s"
        )
        threads = [
            threading.Thread(target=target, daemon=True)
            for target in (self.scraper, self.controller, self.sampler)
        ]
        for thread in threads:
            thread.start()
        soak_start = time.monotonic()
        self.workers_cpu.append(self.workers_cpu_seconds())
        while (left := config.duration - (time.monotonic() - soak_start)) > 0:
            time.sleep(min(10.0, left))
            if self.samples:
                last = self.samples[-1]
                calls = sum(map(len, self.latencies.samples.values()))
                progress(
                    f"  {time.monotonic() - soak_start:6.0f} s"
                    f"  rss {last['rss_bytes'] / 2**20:6.1f} MiB  fds {last['fds']:4.0f}"
                    f"  calls {calls}  failed {len(self.latencies.failures)}"
                )
        # The last sample under load: the clients' connections still count.
        assert self.sidecar is not None
        self.samples.append(proc_sample(self.sidecar.pid))
        self.workers_cpu.append(self.workers_cpu_seconds())
        self.loadavg = os.getloadavg()
        self.stop.set()
        for thread in threads:
            thread.join(60)
        verification = self.stop_workers_and_verify()
        return self.report(soak_start, verification)

    def report(self, soak_start: float, verification: dict[str, Any]) -> dict[str, Any]:
        config = self.config
        after_warmup = [
            s for s in self.samples if s["time"] - self.samples[0]["time"] >= config.warmup
        ]
        start = after_warmup[0] if after_warmup else self.samples[0]
        end = self.samples[-1]
        cpu = end["cpu_seconds"] - self.samples[0]["cpu_seconds"]
        wall = end["time"] - self.samples[0]["time"]
        return {
            "config": {k: v for k, v in asdict(config).items() if k != "directory"},
            "machine": {
                "cpus": os.cpu_count(),
                "python": sys.version.split()[0],
                "loadavg_1_5_15": self.loadavg,
                "workers_cpu_percent_of_one_core": (
                    100 * (self.workers_cpu[-1] - self.workers_cpu[0]) / config.duration
                ),
            },
            "sidecar": {
                "rss_start_mib": start["rss_bytes"] / 2**20,
                "rss_end_mib": end["rss_bytes"] / 2**20,
                "rss_max_mib": max(s["rss_bytes"] for s in after_warmup or self.samples) / 2**20,
                "rss_growth_percent": 100
                * (end["rss_bytes"] - start["rss_bytes"])
                / start["rss_bytes"],
                "fds_start": start["fds"],
                "fds_end": end["fds"],
                "fds_max": max(s["fds"] for s in after_warmup or self.samples),
                "cpu_percent_of_one_core": 100 * cpu / wall if wall else 0.0,
                "samples": len(self.samples),
            },
            "latency": {kind: percentiles(s) for kind, s in sorted(self.latencies.samples.items())},
            "scrape_bytes_gzip_median": sorted(self.scrape_bytes)[len(self.scrape_bytes) // 2]
            if self.scrape_bytes
            else 0,
            "calls": sum(map(len, self.latencies.samples.values())),
            "calls_failed": len(self.latencies.failures),
            "failures": self.latencies.failures[:20],
            "verification": verification,
        }


def run_soak(
    config: SoakConfig, progress: Callable[[str], None] = lambda line: None
) -> dict[str, Any]:
    soak = Soak(config)
    try:
        return soak.run(progress)
    finally:
        soak.close()


def print_report(report: dict[str, Any]) -> None:
    side = report["sidecar"]
    print(
        f"sidecar rss {side['rss_start_mib']:.1f} -> {side['rss_end_mib']:.1f} MiB "
        f"({side['rss_growth_percent']:+.1f} %, max {side['rss_max_mib']:.1f}), "
        f"fds {side['fds_start']:.0f} -> {side['fds_end']:.0f} (max {side['fds_max']:.0f}), "
        f"cpu {side['cpu_percent_of_one_core']:.0f} % of one core"
    )
    machine = report["machine"]
    print(
        f"workers' cpu {machine['workers_cpu_percent_of_one_core']:.0f} % of one core, "
        f"load average {machine['loadavg_1_5_15'][0]:.1f} on {machine['cpus']} cpus"
    )
    for kind, p in report["latency"].items():
        print(
            f"  {kind:<15} n={p['count']:<6} p50 {p['p50_ms']:7.1f} ms  p95 {p['p95_ms']:7.1f} ms"
            f"  p99 {p['p99_ms']:7.1f} ms  max {p['max_ms']:7.1f} ms"
        )
    print(f"calls {report['calls']}, failed {report['calls_failed']}")
    for failure in report["failures"]:
        print(f"  {failure}")
    print("verification:", json.dumps(report["verification"], indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=SoakConfig.workers)
    parser.add_argument("--series", type=int, default=SoakConfig.series)
    parser.add_argument("--duration", type=float, default=SoakConfig.duration, help="seconds")
    parser.add_argument("--warmup", type=float, default=SoakConfig.warmup, help="seconds")
    parser.add_argument("--control-pause", type=float, default=SoakConfig.control_pause)
    parser.add_argument("--dir", help="keep logs here instead of a temporary directory")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args()
    config = SoakConfig(
        workers=args.workers,
        series=args.series,
        duration=args.duration,
        warmup=args.warmup,
        control_pause=args.control_pause,
        directory=args.dir,
    )
    report = run_soak(config, progress=lambda line: print(line, flush=True))
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    v = report["verification"]
    ok = (
        report["calls_failed"] == 0
        and v["series_lost"] == 0
        and v["series_double_counted"] == 0
        and v["workers_with_wrong_steps"] == 0
        and v["frames_rejected"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
