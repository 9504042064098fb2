"""A worker for the soak: ``soak_worker.py SERIES TOTALS_FILE``.

A real ``worker_hooks`` process with SERIES metric series (counters, gauges
and a few histograms), all of which change every second: ten times a second
a tenth of them is updated and ``step()`` is called. The connection thread
pushes the changes every ``RANKSIDE_FLUSH_INTERVAL`` (1 s).

On SIGTERM it stops, lets ``worker_main`` send its last metrics and ``bye``,
and writes to TOTALS_FILE what it counted itself, so the soak can check that
the sidecar shows exactly that: nothing lost, nothing counted twice.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

import worker_hooks
from worker_hooks import metrics

TICKS_PER_SECOND = 10
HISTOGRAM_SERIES = 10


STOP: list[int] = []


def _stop(signum: int, frame: Any) -> None:
    # Only a flag: the loop stops between ticks, so that no increment is
    # counted here and not in the metric, or the other way round.
    STOP.append(signum)


def main() -> None:
    series = int(sys.argv[1])
    totals_file = sys.argv[2]
    histograms = min(HISTOGRAM_SERIES, series // 10)
    counters = (series - histograms) // 2
    gauges = series - histograms - counters
    events = metrics.counter("soak_events_total", "Events counted by the soak worker.", ["shard"])
    levels = metrics.gauge("soak_level", "A level the soak worker sets.", ["shard"])
    latency = metrics.histogram("soak_latency_seconds", "Soak observations.", ["shard"])
    counter_children = [events.labels(shard=str(i)) for i in range(counters)]
    gauge_children = [levels.labels(shard=str(i)) for i in range(gauges)]
    histogram_children = [latency.labels(shard=str(i)) for i in range(histograms)]
    counted = [0] * counters
    observed = [0] * histograms
    signal.signal(signal.SIGTERM, _stop)
    tick = 0
    try:
        with worker_hooks.worker_main():
            next_tick = time.monotonic()
            while not STOP:
                part = tick % TICKS_PER_SECOND
                for i in range(part, counters, TICKS_PER_SECOND):
                    counter_children[i].inc()
                    counted[i] += 1
                for i in range(part, gauges, TICKS_PER_SECOND):
                    gauge_children[i].set(tick + i)
                for i in range(part, histograms, TICKS_PER_SECOND):
                    histogram_children[i].observe((tick % 100) / 1000)
                    observed[i] += 1
                worker_hooks.step()
                tick += 1
                next_tick += 1 / TICKS_PER_SECOND
                time.sleep(max(0.0, next_tick - time.monotonic()))
    finally:
        with open(totals_file, "w") as fp:
            json.dump({"events": counted, "observed": observed, "steps": tick}, fp)


if __name__ == "__main__":
    main()
