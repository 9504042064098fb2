"""Relay latency: rankside's sidecar against torch's in-process WorkerServer and the floor.

Starts a real sidecar with one worker, a second worker running torch 2.13's
own ``_WorkerServer`` on a unix socket (and a third on TCP), and the floor:
``bench/floor_app.py``, a pure ASGI app answering ``pong`` on the sidecar's
own uvicorn configuration, the least any relay served by uvicorn can cost.
The workers import torch and run the same training-like loop. One
``http.client`` persistent connection per server makes the calls, ``ping``
and ``dump_traceback``, interleaved in blocks so that drift in the machine's
load hits all alike, and the bench reports medians, p99s and their ratios:
relayed ``ping`` against the floor, relayed ``dump_traceback`` against
torch's server (both need the worker's GIL there). Then 63 more workers join
and ``dump_traceback`` is fanned out to all 64.

    .venv/bin/python bench/bench_relay.py [--calls 2000] [--fanout-workers 64]

The sidecar and the floor are reached over TCP on 127.0.0.1 (the sidecar
serves HTTP on TCP only), torch's server over its unix socket and TCP;
torch's server closes a keep-alive connection after 30 requests, so its
client reconnects that often.
"""

from __future__ import annotations

import argparse
import http.client
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
FLOOR = Path(__file__).resolve().parent / "floor_app.py"
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


class UnixHTTPConnection(http.client.HTTPConnection):
    """An ``http.client`` connection to an HTTP server on a unix socket."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=60)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def poster(conn: http.client.HTTPConnection, path: str) -> Callable[[], None]:
    """One POST of ``path`` on ``conn``'s persistent connection, reopened once closed."""

    def call() -> None:
        conn.request("POST", path, body=b"", headers={"Content-Length": "0"})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise SystemExit(f"bench: {path} failed: {response.status} {body[:200]!r}")

    return call


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - start) / 1000


def side_by_side(calls: int, targets: list[Callable[[], None]]) -> list[list[float]]:
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


def succeeds(client: httpx.Client, path: str) -> Callable[[], bool]:
    return lambda: client.post(path).status_code == 200


def row(label: str, samples: list[float], unit: str = "us", tail: float = 0.99) -> dict[str, float]:
    """Print and answer the median and the ``tail`` percentile of ``samples``."""
    median, high, name = statistics.median(samples), percentile(samples, tail), f"p{tail * 100:g}"
    print(f"  {label:<34} median {median:9.0f} {unit}   {name} {high:9.0f} {unit}")
    return {"median": median, name: high}


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
            wait(succeeds(client, "/handler/ping"), 60, "torch's server")
        floor_port = free_port()
        stack.enter_context(process([py, str(FLOOR), str(floor_port)]))
        floor_probe = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{floor_port}"))
        wait(succeeds(floor_probe, "/"), 30, "the floor app")

        ours_conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        uds_conn = UnixHTTPConnection(torch_sock)
        tcp_conn = http.client.HTTPConnection("127.0.0.1", torch_port, timeout=60)
        floor_conn = http.client.HTTPConnection("127.0.0.1", floor_port, timeout=60)
        for conn in (ours_conn, uds_conn, tcp_conn, floor_conn):
            stack.callback(conn.close)
        for handler in ("ping", "dump_traceback"):
            a, b, c, f = side_by_side(
                args.calls,
                [
                    poster(ours_conn, f"/api/v1/workers/0/handlers/{handler}"),
                    poster(uds_conn, f"/handler/{handler}"),
                    poster(tcp_conn, f"/handler/{handler}"),
                    poster(floor_conn, "/"),
                ],
            )
            print(f"{handler}: {args.calls} sequential calls each")
            ours_row = results[f"{handler}_rankside"] = row("rankside sidecar (TCP) -> worker", a)
            uds_row = results[f"{handler}_torch_uds"] = row("torch _WorkerServer, unix socket", b)
            tcp_row = results[f"{handler}_torch_tcp"] = row("torch _WorkerServer, TCP", c)
            floor_row = results[f"{handler}_floor"] = row("floor: raw ASGI pong (TCP)", f)
            others = {"unix_socket": uds_row, "tcp": tcp_row, "floor": floor_row}
            ratio = results[f"{handler}_ratio"] = {
                f"{stat}_{name}": ours_row[stat] / other[stat]
                for stat in ("median", "p99")
                for name, other in others.items()
            }
            for stat in ("median", "p99"):
                print(
                    f"  {stat} ratio rankside/torch: {ratio[f'{stat}_unix_socket']:.2f}x (unix "
                    f"socket), {ratio[f'{stat}_tcp']:.2f}x (TCP); "
                    f"rankside/floor: {ratio[f'{stat}_floor']:.2f}x"
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
