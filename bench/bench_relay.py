"""Relay latency: rankside's sidecar against torch's in-process WorkerServer.

Starts a real sidecar with one worker, and a second worker running torch
2.13's own ``_WorkerServer`` on a unix socket; both workers import torch and
run the same training-like loop. One client with a persistent connection
calls ``ping`` and ``dump_traceback`` on each, interleaved in blocks so that
drift in the machine's load hits both alike, and reports median and p99.
Then 63 more workers join and ``dump_traceback`` is fanned out to all 64.

    .venv/bin/python bench/bench_relay.py [--calls 2000] [--fanout-workers 64]

The sidecar is reached over TCP on 127.0.0.1 (it serves HTTP on TCP only),
torch's server over its unix socket; torch's server closes a keep-alive
connection after 30 requests, so its client reconnects that often.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "relay_worker.py"
BLOCK = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.05)
    raise SystemExit(f"bench: timed out waiting for {what}")


@contextmanager
def process(cmd: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(call: Callable[[], httpx.Response]) -> float:
    start = time.perf_counter_ns()
    response = call()
    elapsed = (time.perf_counter_ns() - start) / 1000
    if response.status_code != 200:
        raise SystemExit(f"bench: call failed: {response.status_code} {response.text[:200]}")
    return elapsed


def side_by_side(calls: int, targets: list[Callable[[], httpx.Response]]) -> list[list[float]]:
    """Time ``calls`` calls of each target, alternating in blocks so load drift hits all alike."""
    for _ in range(BLOCK):  # warm-up: connections, caches, first-call imports
        for target in targets:
            target()
    samples: list[list[float]] = [[] for _ in targets]
    while len(samples[0]) < calls:
        n = min(BLOCK, calls - len(samples[0]))
        for target, found in zip(targets, samples, strict=True):
            found += [timed(target) for _ in range(n)]
    return samples


def poster(client: httpx.Client, path: str) -> Callable[[], httpx.Response]:
    return lambda: client.post(path)


def succeeds(call: Callable[[], httpx.Response]) -> Callable[[], bool]:
    return lambda: call().status_code == 200


def row(label: str, samples: list[float], unit: str = "us") -> dict[str, float]:
    median, p99 = statistics.median(samples), percentile(samples, 0.99)
    print(f"  {label:<34} median {median:9.0f} {unit}   p99 {p99:9.0f} {unit}")
    return {"median": median, "p99": p99}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--fanout-workers", type=int, default=64)
    parser.add_argument("--fanout-calls", type=int, default=50)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}

    with tempfile.TemporaryDirectory(prefix="rankside-bench-") as tmp, ExitStack() as stack:
        sock, torch_sock, port = f"{tmp}/rankside.sock", f"{tmp}/torch.sock", free_port()
        py = sys.executable
        stack.enter_context(
            process(
                [py, "-m", "sidecar", "serve", "--socket", sock,
                 "--listen", f"127.0.0.1:{port}", "--log-level", "warning"]
            )
        )  # fmt: skip
        ours = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60))
        wait(lambda: ours.get("/readyz").status_code == 200, 30, "the sidecar")
        rank0 = {"RANKSIDE_SOCKET": sock, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "64"}
        torch_port = free_port()
        stack.enter_context(process([py, str(WORKER), "rankside"], rank0))
        stack.enter_context(process([py, str(WORKER), "torch", torch_sock]))
        stack.enter_context(process([py, str(WORKER), "torch-tcp", str(torch_port)]))
        torch_uds = stack.enter_context(
            httpx.Client(
                transport=httpx.HTTPTransport(uds=torch_sock), base_url="http://torch", timeout=60
            )
        )
        torch_tcp = stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{torch_port}", timeout=60)
        )
        wait(lambda: ours.get("/api/v1/workers/0").status_code == 200, 60, "the worker")
        for client in (torch_uds, torch_tcp):
            wait(succeeds(poster(client, "/handler/ping")), 60, "torch's server")

        for handler in ("ping", "dump_traceback"):
            a, b, c = side_by_side(
                args.calls,
                [
                    poster(ours, f"/api/v1/workers/0/handlers/{handler}"),
                    poster(torch_uds, f"/handler/{handler}"),
                    poster(torch_tcp, f"/handler/{handler}"),
                ],
            )
            print(f"{handler}: {args.calls} sequential calls each")
            ours_row = results[f"{handler}_rankside"] = row("rankside sidecar (TCP) -> worker", a)
            uds_row = results[f"{handler}_torch_uds"] = row("torch _WorkerServer, unix socket", b)
            tcp_row = results[f"{handler}_torch_tcp"] = row("torch _WorkerServer, TCP", c)
            results[f"{handler}_ratio"] = {
                "vs_unix_socket": ours_row["median"] / uds_row["median"],
                "vs_tcp": ours_row["median"] / tcp_row["median"],
            }
            ratio = results[f"{handler}_ratio"]
            print(
                f"  median ratio rankside/torch: {ratio['vs_unix_socket']:.2f}x (torch on a "
                f"unix socket), {ratio['vs_tcp']:.2f}x (torch on TCP)"
            )

        if args.fanout_workers > 0:
            for rank in range(1, args.fanout_workers):
                env = {**rank0, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                stack.enter_context(process([py, str(WORKER), "rankside", "--no-torch"], env))

            def running() -> bool:
                workers: list[dict[str, str]] = ours.get("/api/v1/workers").json()["workers"]
                count = sum(w["state"] == "running" for w in workers)
                return bool(count >= args.fanout_workers)

            wait(running, 120, f"{args.fanout_workers} workers")

            def fan_out() -> httpx.Response:
                response = ours.post("/api/v1/handlers/dump_traceback?timeout=10")
                if response.json()["summary"]["ok"] != args.fanout_workers:
                    raise SystemExit(f"bench: fan-out incomplete: {response.json()['summary']}")
                return response

            for _ in range(5):
                fan_out()
            samples = [timed(fan_out) / 1000 for _ in range(args.fanout_calls)]
            print(f"fan-out: dump_traceback on {args.fanout_workers} workers, one call")
            results["fanout_dump_traceback"] = row(f"{args.fanout_calls} calls", samples, unit="ms")

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
