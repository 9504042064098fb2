"""The cost of reading collective progress for a heartbeat, against a training step's collective.

One gloo process group of one rank; after WARMUP all_reduces (the flight
recorder holds its default 2,000 entries), times in interleaved blocks:
``CollectiveProgress.read()`` (what the connection thread does once per
heartbeat), the recorder's full JSON dump with its entries, one ``all_reduce``
of a small tensor (the cheapest collective a training step makes), and what an
incident asks of each rank: the ``fr_trace_dump`` handler's pickle with and
without stack traces, the ``fr_recent`` handler's JSON, and the arrivals read
(what a heartbeat carries every ``RANKSIDE_LAG_INTERVAL``). Reports medians,
p99s, the ratios and the bytes. Then the arrivals' cost on training itself:
steps per second (a 64x64 matmul and an all_reduce on the main thread) in
alternating one-second blocks, with the reads every second on a thread of
their own and without, and that slowdown scaled to the default 30 s.

Then, each in a fresh process (the symbolizer starts once per process): the
first and second recorder dump with stack traces, without the warm-up and
after it, with the warm-up's own time and how fast a spinning Python thread
ran meanwhile, against its idle rate.

    .venv/bin/python bench/bench_collectives.py [--samples 2000]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_relay import free_port, percentile

WARMUP = 2500
BLOCK = 50


def first_dumps(warm: bool) -> None:
    """In this fresh process: the first two dumps with stacks, after the warm-up if ``warm``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import torch
    import torch.distributed as dist

    from worker_hooks import collectives

    dist.init_process_group("gloo", rank=0, world_size=1)
    tensor = torch.ones(16)
    for _ in range(10):
        dist.all_reduce(tensor)
    result: dict[str, float] = {}
    if warm:
        spins = [0]
        stop = threading.Event()

        def spin() -> None:
            while not stop.is_set():
                spins[0] += 1

        spinner = threading.Thread(target=spin, daemon=True)
        spinner.start()
        before, started = spins[0], time.perf_counter()
        time.sleep(1.0)
        idle = (spins[0] - before) / (time.perf_counter() - started)
        before = spins[0]
        result["warmup"] = collectives.warm_symbolizer()
        # As the warm-up thread records it: dumps carry stacks once it is done.
        collectives.warmup_seconds = result["warmup"]
        result["spin_ratio"] = (spins[0] - before) / result["warmup"] / idle
        stop.set()
        spinner.join()
    for name in ("first", "second"):
        started = time.perf_counter()
        collectives.recorder_dump(stack_traces=True)
        result[name] = time.perf_counter() - started
    print(json.dumps(result))
    dist.destroy_process_group()


def symbolizer_report() -> None:
    print("\nfirst dumps with stack traces, each case in a fresh process:")
    for warm in (False, True):
        mode = "warm" if warm else "cold"
        command = [sys.executable, __file__, "--first-dumps", mode]
        # Without the warm-up a dump asks for stacks only with it turned off.
        env = {**os.environ, "RANKSIDE_FR_WARMUP": "1" if warm else "0"}
        out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
        got = json.loads(out.strip().splitlines()[-1])
        label = "after warm-up" if warm else "no warm-up"
        line = f"  {label:14} first {got['first'] * 1e3:8.1f} ms"
        line += f"   second {got['second'] * 1e3:6.2f} ms"
        if warm:
            line += (
                f"   (warm-up {got['warmup']:.2f} s, a spinning thread ran at "
                f"{got['spin_ratio']:.2f} of its idle rate)"
            )
        print(line)


def step_overhead(dist: Any, tensor: Any, interval: float, seconds: float) -> tuple[float, float]:
    """Training steps per second without and with ``arrivals()`` every ``interval`` s.

    A step is a small matmul and an all_reduce, on the main thread; the reads
    run on a thread of their own, as the connection thread does. Alternating
    one-second blocks of each, for ``seconds`` in all; medians of the blocks.
    """
    import threading

    import torch

    from worker_hooks.collectives import CollectiveProgress

    progress = CollectiveProgress()
    weights = torch.randn(64, 64)
    reading = threading.Event()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            if reading.is_set():
                progress.arrivals()
            stop.wait(interval)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    rates: dict[bool, list[float]] = {False: [], True: []}
    deadline = time.perf_counter() + seconds
    with_reads = False
    while time.perf_counter() < deadline:
        with_reads = not with_reads
        if with_reads:
            reading.set()
        else:
            reading.clear()
        steps, started = 0, time.perf_counter()
        while time.perf_counter() - started < 1.0:
            torch.mm(weights, weights)
            dist.all_reduce(tensor)
            steps += 1
        rates[with_reads].append(steps / (time.perf_counter() - started))
    stop.set()
    thread.join()
    return statistics.median(rates[False]), statistics.median(rates[True])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument(
        "--overhead-seconds",
        type=float,
        default=60.0,
        help="how long to measure training steps with and without the arrivals reads",
    )
    parser.add_argument("--first-dumps", choices=("cold", "warm"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.first_dumps:
        first_dumps(args.first_dumps == "warm")
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import torch
    import torch.distributed as dist

    from worker_hooks import collectives
    from worker_hooks.collectives import CollectiveProgress

    dist.init_process_group("gloo", rank=0, world_size=1)
    tensor = torch.ones(16)
    for _ in range(WARMUP):
        dist.all_reduce(tensor)
    progress = CollectiveProgress()
    c10d = importlib.import_module("torch._C._distributed_c10d")
    # Not timed: the symbolizer's start is measured apart, in fresh processes.
    collectives.warm_symbolizer()
    cases: dict[str, Callable[[], object]] = {
        "heartbeat read": progress.read,
        "all_reduce": lambda: dist.all_reduce(tensor),
        "full dump": lambda: c10d._dump_fr_trace_json(True, False),
        "fr_trace_dump": lambda: collectives.recorder_dump(stack_traces=True),
        "  no stacks": lambda: collectives.recorder_dump(stack_traces=False),
        "fr_recent": lambda: collectives.recent_collectives(16),
        # What a heartbeat does every RANKSIDE_LAG_INTERVAL: the entries, then the new ones.
        "arrivals": lambda: CollectiveProgress().arrivals(),
    }
    # The dumps are slow: fewer samples, in the same interleaving.
    counts = {name: 50 for name in cases}
    counts.update({"heartbeat read": args.samples, "all_reduce": args.samples})
    samples: dict[str, list[float]] = {name: [] for name in cases}
    while any(len(samples[n]) < counts[n] for n in cases):
        for name, call in cases.items():
            for _ in range(min(BLOCK, counts[name] - len(samples[name]))):
                started = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - started)
    sizes = {
        "heartbeat read": len(json.dumps(progress.read())),
        "full dump": len(c10d._dump_fr_trace_json(True, False)),
        "fr_trace_dump": len(collectives.recorder_dump(stack_traces=True)),
        "  no stacks": len(collectives.recorder_dump(stack_traces=False)),
        "fr_recent": len(json.dumps(collectives.recent_collectives(16), indent=1)),
    }
    reference = statistics.median(samples["all_reduce"])
    print(f"{'':16} {'median':>12} {'p99':>12} {'vs all_reduce':>14} {'bytes':>9}")
    for name, values in samples.items():
        median = statistics.median(values)
        print(
            f"{name:16} {median * 1e6:10.1f}us {percentile(values, 0.99) * 1e6:10.1f}us "
            f"{median / reference:13.2f}x {sizes.get(name, 0):9}"
        )
    interval = 1.0
    plain, reading = step_overhead(dist, tensor, interval, args.overhead_seconds)
    slowdown = 1 - reading / plain
    print(
        f"training steps: {plain:.0f}/s alone, {reading:.0f}/s with arrivals read every "
        f"{interval:g} s ({slowdown * 100:.2f} % slower); at the default 30 s: "
        f"{slowdown * interval / 30 * 100:.3f} %"
    )
    dist.destroy_process_group()
    symbolizer_report()


if __name__ == "__main__":
    main()
