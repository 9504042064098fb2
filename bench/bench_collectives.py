"""The cost of reading collective progress for a heartbeat, against a training step's collective.

One gloo process group of one rank; after WARMUP all_reduces (the flight
recorder holds its default 2,000 entries), times in interleaved blocks:
``CollectiveProgress.read()`` (what the connection thread does once per
heartbeat), the recorder's full JSON dump with its entries (what is left for
incidents), and one ``all_reduce`` of a small tensor (the cheapest collective a
training step makes). Reports medians, p99s and the ratios.

    .venv/bin/python bench/bench_collectives.py [--samples 2000]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_relay import free_port, percentile

WARMUP = 2500
BLOCK = 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import torch
    import torch.distributed as dist

    from worker_hooks.collectives import CollectiveProgress

    dist.init_process_group("gloo", rank=0, world_size=1)
    tensor = torch.ones(16)
    for _ in range(WARMUP):
        dist.all_reduce(tensor)
    progress = CollectiveProgress()
    c10d = importlib.import_module("torch._C._distributed_c10d")
    cases: dict[str, Callable[[], object]] = {
        "heartbeat read": progress.read,
        "all_reduce": lambda: dist.all_reduce(tensor),
        "full dump": lambda: c10d._dump_fr_trace_json(True, False),
    }
    # The full dump is slow: fewer samples, in the same interleaving.
    counts = {"heartbeat read": args.samples, "all_reduce": args.samples, "full dump": 50}
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
    }
    reference = statistics.median(samples["all_reduce"])
    print(f"{'':16} {'median':>12} {'p99':>12} {'vs all_reduce':>14} {'bytes':>9}")
    for name, values in samples.items():
        median = statistics.median(values)
        print(
            f"{name:16} {median * 1e6:10.1f}us {percentile(values, 0.99) * 1e6:10.1f}us "
            f"{median / reference:13.2f}x {sizes.get(name, 0):9}"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
