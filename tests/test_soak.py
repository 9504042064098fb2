"""A short soak: bench/soak.py with fewer workers and seconds instead of minutes.

Real worker processes, each with 1,000 series that all change every second,
while /metrics is scraped every second and control calls run in a loop. No
call may fail, the sidecar's descriptors and memory stay flat, and at the end
every worker's own count of every series equals what the sidecar exposes.
docs/reliability.md has the figures of the 10-minute run with 64 workers.
"""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from soak import SoakConfig, print_report, run_soak


def test_short_soak(tmp_path: Path) -> None:
    config = SoakConfig(
        workers=12,
        series=1000,
        duration=6.0,
        warmup=2.0,
        sample_interval=1.0,
        directory=str(tmp_path),
    )
    report = run_soak(config)
    print_report(report)
    assert report["calls_failed"] == 0, report["failures"]
    assert report["calls"] > 50
    verification = report["verification"]
    assert verification["series_checked"] == 12 * 505
    assert verification["series_lost"] == 0, verification["mismatches"]
    assert verification["series_double_counted"] == 0, verification["mismatches"]
    assert verification["workers_with_wrong_steps"] == 0, verification["mismatches"]
    assert verification["worker_exit_codes_nonzero"] == 0
    assert verification["frames_rejected"] == 0
    assert verification["unexpected_events"] == []
    assert verification["tracebacks_in_log"] == 0
    sidecar = report["sidecar"]
    assert sidecar["fds_end"] == sidecar["fds_start"]
    assert sidecar["rss_growth_percent"] < 20
    assert report["latency"]["scrape"]["count"] >= 5
