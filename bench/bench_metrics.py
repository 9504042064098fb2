"""Metrics benchmarks, side by side with prometheus_client, in one run.

1. Hot path: ``inc()``, ``set()``, ``observe()`` and ``labels(...).inc()`` in a
   worker, against prometheus_client in single-process mode and, in a
   subprocess, in multiprocess mode (PROMETHEUS_MULTIPROC_DIR).
2. Scrape: a real sidecar process holding 64 workers with 1,000 series each
   (about 100k lines), pushed over the real socket protocol every second,
   against prometheus_client's own HTTP server with a MultiProcessCollector
   over the same series. Both are fetched with GET /metrics, alternately,
   text and gzip; each sidecar scrape waits for a fresh round of pushes, so
   no scrape is served from the render cache.
3. Ingest: the sidecar's CPU time and resident memory while the 64 workers
   push every second (every series changes each time).

Usage: python bench/bench_metrics.py [--quick] [--steps]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORKERS = 64
PUSHERS = 4  # processes that play the 64 workers, 16 each
COUNTER_FAMILIES, COUNTERS_PER_FAMILY = 6, 100
GAUGE_FAMILIES, GAUGES_PER_FAMILY = 4, 90
HISTOGRAM_FAMILIES, HISTOGRAMS_PER_FAMILY = 2, 20  # 1,000 series per worker in all


# -- 1. hot path --------------------------------------------------------------------


def time_op(op: Callable[[], None], number: int, repeat: int) -> float:
    """Median nanoseconds per call."""
    runs = timeit.repeat(op, number=number, repeat=repeat)
    return statistics.median(runs) / number * 1e9


def hot_path_ops(
    counter: Any, gauge: Any, hist: Any, labelled: Any
) -> dict[str, Callable[[], None]]:
    """The same four calls, whichever library's metric objects they are made on."""
    return {
        "counter.inc()": counter.inc,
        "gauge.set(v)": lambda: gauge.set(1.5),
        "histogram.observe(v)": lambda: hist.observe(0.3),
        "counter.labels(kind=..).inc()": lambda: labelled.labels(kind="a").inc(),
    }


def prometheus_client_ops() -> dict[str, Callable[[], None]]:
    import prometheus_client as pc

    registry = pc.CollectorRegistry()
    counter = pc.Counter("bench_events", "doc", registry=registry)
    gauge = pc.Gauge("bench_level", "doc", registry=registry)
    hist = pc.Histogram("bench_seconds", "doc", registry=registry)
    labelled = pc.Counter("bench_labelled", "doc", ["kind"], registry=registry)
    labelled.labels(kind="a")
    return hot_path_ops(counter, gauge, hist, labelled)


def rankside_ops() -> dict[str, Callable[[], None]]:
    from worker_hooks.metrics import MetricRegistry

    registry = MetricRegistry()
    counter = registry.counter("bench_events", "doc")
    gauge = registry.gauge("bench_level", "doc")
    hist = registry.histogram("bench_seconds", "doc")
    labelled = registry.counter("bench_labelled", "doc", ["kind"])
    labelled.labels(kind="a")
    return hot_path_ops(counter, gauge, hist, labelled)


def measure_ops(ops: dict[str, Callable[[], None]], number: int, repeat: int) -> dict[str, float]:
    # counter.inc() and gauge.set() bind no lambda; time the lambdas' own cost
    # to leave it out, so every figure is the call itself.
    overhead = time_op(lambda: None, number, repeat)
    result = {}
    for name, op in ops.items():
        cost = time_op(op, number, repeat)
        result[name] = cost - overhead if op.__name__ == "<lambda>" else cost
    return result


def multiprocess_child(number: int, repeat: int) -> None:
    """Runs in a subprocess with PROMETHEUS_MULTIPROC_DIR set."""
    print(json.dumps(measure_ops(prometheus_client_ops(), number, repeat)))


def hot_path(number: int, repeat: int) -> None:
    # Interleave the in-process runs so that machine noise hits all alike.
    ours: dict[str, list[float]] = {}
    single: dict[str, list[float]] = {}
    for _ in range(3):
        for name, ns in measure_ops(rankside_ops(), number, repeat).items():
            ours.setdefault(name, []).append(ns)
        for name, ns in measure_ops(prometheus_client_ops(), number, repeat).items():
            single.setdefault(name, []).append(ns)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": tmp}
        out = subprocess.run(
            [sys.executable, __file__, "--multiprocess-child", str(number), str(repeat)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    multi = json.loads(out)
    print("\n## Hot path (median ns per call)\n")
    print("| operation | rankside | prometheus_client | multiprocess mode | speed-up | vs mp |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ours:
        r, s, m = statistics.median(ours[name]), statistics.median(single[name]), multi[name]
        print(f"| `{name}` | {r:.0f} | {s:.0f} | {m:.0f} | {s / r:.1f}x | {m / r:.1f}x |")


def step_path(number: int, repeat: int) -> None:
    """``step()`` and ``step(n)`` as a training loop calls them, with no sidecar."""
    from worker_hooks.progress import step

    ops: dict[str, Callable[[], None]] = {"step()": step, "step(n)": lambda: step(12345)}
    runs: dict[str, list[float]] = {}
    for _ in range(3):
        for name, ns in measure_ops(ops, number, repeat).items():
            runs.setdefault(name, []).append(ns)
    print("\n## step() (median ns per call)\n")
    print("| operation | rankside |")
    print("|---|---:|")
    for name, values in runs.items():
        print(f"| `{name}` | {statistics.median(values):.0f} |")


# -- workers for the scrape and ingest runs --------------------------------------------


def define_worker_metrics(registry: Any, extra_labels: tuple[str, ...] = ()) -> list[Any]:
    """The 1,000 series of one worker; returns (child, kind) pairs to update."""
    children: list[Any] = []
    for i in range(COUNTER_FAMILIES):
        family = registry(
            "counter", f"app_requests_{i}_total", "Requests handled.", (*extra_labels, "endpoint")
        )
        children += [
            (family, "counter", {"endpoint": f"/api/v{j}"}) for j in range(COUNTERS_PER_FAMILY)
        ]
    for i in range(GAUGE_FAMILIES):
        family = registry(
            "gauge", f"app_queue_depth_{i}", "Items queued.", (*extra_labels, "queue")
        )
        children += [(family, "gauge", {"queue": f"q{j}"}) for j in range(GAUGES_PER_FAMILY)]
    for i in range(HISTOGRAM_FAMILIES):
        family = registry(
            "histogram", f"app_latency_{i}_seconds", "Latency.", (*extra_labels, "op")
        )
        children += [(family, "histogram", {"op": f"op{j}"}) for j in range(HISTOGRAMS_PER_FAMILY)]
    return children


def update(child: Any, kind: str, k: int) -> None:
    if kind == "counter":
        child.inc(k)
    elif kind == "gauge":
        child.set(k * 1.25)
    else:
        child.observe(0.003 * (k % 700))


def pusher(socket_path: str, first_rank: int, count: int) -> None:
    """Plays ``count`` workers over the real protocol, pushing every second."""
    from worker_hooks import protocol
    from worker_hooks.metrics import MetricRegistry

    workers = []
    for rank in range(first_rank, first_rank + count):
        registry = MetricRegistry(builtins=True)

        def define(
            kind: str, name: str, doc: str, labels: tuple[str, ...], r: Any = registry
        ) -> Any:
            return getattr(r, kind)(name, doc, labels)

        children = [
            (family.labels(**labels), kind)
            for family, kind, labels in define_worker_metrics(define)
        ]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(socket_path)
        identity = {
            "rank": rank, "local_rank": rank % 8, "world_size": WORKERS, "local_world_size": 8,
            "group_rank": rank // 8, "role": "trainer", "pid": os.getpid(),
            "hostname": socket.gethostname(), "run_id": "bench", "restart_count": 0,
        }  # fmt: skip
        sock.sendall(protocol.encode(
            {"type": "hello", "version": protocol.PROTOCOL_VERSION, "identity": identity,
             "handlers": []}
        ))  # fmt: skip
        sock.recv(65536)  # welcome
        workers.append((sock, registry, children))
    tick = 0
    while True:
        started = time.monotonic()
        tick += 1
        for sock, registry, children in workers:
            for child, kind in children:
                update(child, kind, tick)
            heartbeat = {"type": "heartbeat", "step": tick, "steps": tick + 1,
                         "progress_time": time.time()}  # fmt: skip
            body = registry.collect_payload(full=tick == 1)
            frames = protocol.encode(heartbeat)
            if body is not None:
                frames += protocol.encode({"type": "metrics"}, body)
            sock.sendall(frames)
        print(tick, flush=True)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


def multiprocess_server(port: int, directory: str) -> None:
    """prometheus_client's HTTP server over a MultiProcessCollector of 64 workers' files."""
    from prometheus_client import (
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        start_http_server,
        values,
    )
    from prometheus_client.multiprocess import MultiProcessCollector

    kinds = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
    for rank in range(WORKERS):
        # One process writes the files of 64, each "worker" under its own pid.
        # A value class per pid: one shared class would move every value made
        # so far into the new pid's file when the pid changes.
        pid = 100_000 + rank
        values.ValueClass = values.MultiProcessValue(lambda pid=pid: pid)

        def define(kind: str, name: str, doc: str, labels: tuple[str, ...]) -> Any:
            return kinds[kind](name, doc, labels, registry=None)

        # A rank label keeps each worker's counters apart, as the sidecar's do.
        for family, kind, labels in define_worker_metrics(define, ("rank",)):
            update(family.labels(rank=str(rank), **labels), kind, 3)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, directory)
    start_http_server(port, addr="127.0.0.1", registry=registry)
    print("ready", flush=True)
    while True:
        time.sleep(3600)


# -- 2. and 3. scrape and ingest -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed_get(client: httpx.Client, url: str, gzip_ok: bool) -> tuple[float, int, int]:
    """Seconds until the last byte of one GET, bytes on the wire, and lines.

    The body is read raw, so the client's own decompression is not timed.
    """
    headers = {"Accept-Encoding": "gzip" if gzip_ok else "identity"}
    start = time.perf_counter()
    with client.stream("GET", url, headers=headers) as response:
        raw = b"".join(response.iter_raw())
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    if response.headers.get("content-encoding") == "gzip":
        text = gzip.decompress(raw)
    else:
        assert not gzip_ok, "asked for gzip, got plain"
        text = raw
    return elapsed, len(raw), text.count(b"\n")


def scrape_and_ingest(scrapes: int, ingest_seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        procs: list[subprocess.Popen[str]] = []
        try:
            sock_path = os.path.join(tmp, "rankside.sock")
            port = free_port()
            sidecar = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "serve", "--socket", sock_path,
                 "--listen", f"127.0.0.1:{port}", "--log-level", "warning"],
                cwd=ROOT, text=True,
            )  # fmt: skip
            procs.append(sidecar)
            client = httpx.Client(timeout=120)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if client.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            mp_dir = os.path.join(tmp, "multiproc")
            os.mkdir(mp_dir)
            mp_port = free_port()
            mp = subprocess.Popen(
                [sys.executable, __file__, "--multiprocess-server", str(mp_port), mp_dir],
                env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": mp_dir},
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            procs.append(mp)
            assert mp.stdout is not None and mp.stdout.readline().strip() == "ready"
            per = WORKERS // PUSHERS
            pushers = []
            for i in range(PUSHERS):
                p = subprocess.Popen(
                    [sys.executable, __file__, "--pusher", sock_path, str(i * per), str(per)],
                    stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                procs.append(p)
                pushers.append(p)

            def wait_round() -> None:
                """Until every pusher has sent one more round."""
                for p in pushers:
                    assert p.stdout is not None
                    p.stdout.readline()

            for _ in range(3):  # connected, full payloads in, deltas flowing
                wait_round()

            # 3. ingest: CPU and memory of the sidecar with no scrape running.
            cpu0, t0 = cpu_seconds(sidecar.pid), time.monotonic()
            rounds = 0
            while time.monotonic() - t0 < ingest_seconds:
                wait_round()
                rounds += 1
            cpu = (cpu_seconds(sidecar.pid) - cpu0) / (time.monotonic() - t0)
            rss = rss_mb(sidecar.pid)

            # 2. scrape, alternating with prometheus_client.
            ours = f"http://127.0.0.1:{port}/metrics"
            theirs = f"http://127.0.0.1:{mp_port}/metrics"
            results: dict[tuple[str, bool], list[tuple[float, int, int]]] = {}
            for _ in range(scrapes):
                for gzip_ok in (False, True):
                    wait_round()  # fresh values from every worker: no cached render
                    results.setdefault(("rankside", gzip_ok), []).append(
                        timed_get(client, ours, gzip_ok)
                    )
                    results.setdefault(("prometheus_client", gzip_ok), []).append(
                        timed_get(client, theirs, gzip_ok)
                    )
            rss_after = rss_mb(sidecar.pid)
        finally:
            for p in reversed(procs):
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()

    print(f"\n## Scrape: {WORKERS} workers x 1,000 series (median of {scrapes} GET /metrics)\n")
    print("| encoding | rankside | MultiProcessCollector | speed-up | lines (ours / theirs) "
          "| bytes (ours / theirs) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for gzip_ok in (False, True):
        ours_s = statistics.median(r[0] for r in results[("rankside", gzip_ok)])
        theirs_s = statistics.median(r[0] for r in results[("prometheus_client", gzip_ok)])
        ours_size, ours_lines = results[("rankside", gzip_ok)][-1][1:]
        theirs_size, theirs_lines = results[("prometheus_client", gzip_ok)][-1][1:]
        print(
            f"| {'gzip' if gzip_ok else 'text'} | {ours_s * 1e3:.1f} ms | {theirs_s * 1e3:.0f} ms "
            f"| {theirs_s / ours_s:.0f}x | {ours_lines:,} / {theirs_lines:,} "
            f"| {ours_size:,} / {theirs_size:,} |"
        )
    print(f"\n## Ingest: {WORKERS} workers pushing every second, every series changed\n")
    print(f"- sidecar CPU: {cpu * 100:.1f}% of one core over {rounds} rounds")
    print(f"- sidecar resident memory: {rss:.0f} MB while ingesting, {rss_after:.0f} MB after "
          "the scrapes")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--steps", action="store_true", help="only the step() benchmark")
    parser.add_argument("--multiprocess-child", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--multiprocess-server", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--pusher", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.multiprocess_child:
        multiprocess_child(*args.multiprocess_child)
    elif args.multiprocess_server:
        multiprocess_server(int(args.multiprocess_server[0]), args.multiprocess_server[1])
    elif args.pusher:
        pusher(args.pusher[0], int(args.pusher[1]), int(args.pusher[2]))
    elif args.steps:
        step_path(number=200_000, repeat=7)
    else:
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
        hot_path(number=50_000 if args.quick else 200_000, repeat=5 if args.quick else 7)
        step_path(number=50_000 if args.quick else 200_000, repeat=5 if args.quick else 7)
        scrape_and_ingest(scrapes=3 if args.quick else 7, ingest_seconds=5 if args.quick else 20)


if __name__ == "__main__":
    main()
