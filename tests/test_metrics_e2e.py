"""/metrics end to end: real sidecar and worker processes, promtool, a real Prometheus."""

from __future__ import annotations

import gzip
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from conftest import SidecarProcess, wait_for
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text
from scrape import OPENMETRICS_ACCEPT, promtool_check
from system_tools import prometheus_scraping

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(sidecar: SidecarProcess) -> Samples:
    text = sidecar.client.get("/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in parse_text(text)
        for s in family.samples
    }


def worker_labels(rank: int) -> set[tuple[str, str]]:
    return {("rank", str(rank)), ("local_rank", str(rank)), ("role", "default")}


def value(samples: Samples, name: str, labels: set[tuple[str, str]]) -> float | None:
    return samples.get((name, frozenset(labels)))


def test_workers_series_reach_metrics(sidecar: SidecarProcess, spawn_worker: Any) -> None:
    for rank in (0, 1):
        spawn_worker("metrics_worker.py", rank=rank, env={"TORCHELASTIC_RESTART_COUNT": "3"})

    def both_pushed() -> Samples | None:
        found = scrape(sidecar)
        ok = all(
            (value(found, "tokens_processed_total", worker_labels(r) | {("split", "train")}) or 0)
            > 0
            and (value(found, "rankside_worker_step_duration_seconds_count", worker_labels(r)) or 0)
            > 0
            # A push reads one metric after another while the loop goes on: the
            # first may carry the tokens of a batch whose time it read before.
            and (value(found, "batch_seconds_count", worker_labels(r)) or 0) > 0
            for r in (0, 1)
        )
        return found if ok else None

    found: Samples = wait_for(both_pushed, timeout=20, what="both workers' series")
    for rank in (0, 1):
        labels = worker_labels(rank)
        assert value(found, "rankside_worker_up", labels) == 1
        assert value(found, "rankside_worker_restarts_total", labels) == 3
        assert (value(found, "rankside_worker_step", labels) or 0) >= 0
        assert (value(found, "rankside_worker_last_progress_timestamp_seconds", labels) or 0) > (
            time.time() - 60
        )
        assert (value(found, "rankside_worker_cpu_seconds_total", labels) or 0) > 0
        assert (value(found, "rankside_worker_resident_memory_bytes", labels) or 0) > 1e6
        assert value(found, "train_loss", labels) is not None
        assert (value(found, "batch_seconds_count", labels) or 0) > 0
        info = [k for k in found if k[0] == "rankside_worker_info" and ("rank", str(rank)) in k[1]]
        assert len(info) == 1 and {"pid", "hostname", "run_id"} <= {n for n, _ in info[0][1]}
    assert value(found, "rankside_workers_connected", set()) == 2
    assert (value(found, "rankside_frames_received_total", {("type", "metrics")}) or 0) > 0

    text = sidecar.client.get("/metrics")
    assert text.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    promtool_check(text.text)
    assert text.text.count("# TYPE tokens_processed_total counter") == 1

    om = sidecar.client.get("/metrics", headers={"Accept": OPENMETRICS_ACCEPT})
    assert om.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert om.text.endswith("# EOF\n")
    assert "tokens_processed" in {f.name for f in parse_openmetrics(om.text)}

    raw = httpx.get(f"{sidecar.url}/metrics", headers={"Accept-Encoding": "gzip"})
    # httpx decodes gzip itself; the header says it was compressed on the wire.
    assert raw.headers["content-encoding"] == "gzip"
    assert "tokens_processed_total{" in raw.text
    with httpx.stream("GET", f"{sidecar.url}/metrics", headers={"Accept-Encoding": "gzip"}) as r:
        body = b"".join(r.iter_raw())
    assert gzip.decompress(body).startswith(b"# HELP")


def test_ended_worker_keeps_series_for_the_grace_period(
    sidecar_factory: Callable[..., SidecarProcess], spawn_worker: Any
) -> None:
    sidecar = sidecar_factory("--grace", "4")
    worker = spawn_worker("metrics_worker.py", "20", rank=0)
    assert worker.proc.wait(30) == 0
    labels = worker_labels(0)
    found = wait_for(
        lambda: (s := scrape(sidecar)) and value(s, "rankside_worker_up", labels) == 0 and s,
        timeout=10,
        what="rankside_worker_up 0",
    )
    # The last push, sent at exit, counted every step.
    assert value(found, "tokens_processed_total", labels | {("split", "train")}) == 20 * 128
    assert value(found, "rankside_worker_step_duration_seconds_count", labels) == 19
    wait_for(
        lambda: not any(("rank", "0") in k[1] for k in scrape(sidecar)),
        timeout=15,
        what="series gone after the grace period",
    )


def test_bad_metrics_payload_is_rejected_and_counted(sidecar: SidecarProcess) -> None:
    from wire import RawPeer

    peer = RawPeer(sidecar.socket_path)
    peer.hello(rank=7)
    peer.read()  # welcome
    peer.send({"type": "metrics"}, b'{"v": 1, "full": true}')
    header, _ = peer.read()
    assert header["type"] == "error" and "bad metrics payload" in header["message"]
    assert peer.closed_by_peer()
    found = scrape(sidecar)
    assert (value(found, "rankside_frames_rejected_total", {("reason", "bad_metrics")}) or 0) >= 1


def test_prometheus_scrapes_the_sidecar(
    sidecar: SidecarProcess, spawn_worker: Any, tmp_path: Path
) -> None:
    spawn_worker("metrics_worker.py", rank=0)
    sidecar.wait_workers(1)
    with prometheus_scraping(tmp_path, f"127.0.0.1:{sidecar.port}") as query:
        result = wait_for(
            lambda: query('tokens_processed_total{rank="0"}'),
            timeout=60,
            interval=0.5,
            what="Prometheus to answer",
        )
        metric = result[0]["metric"]
        assert metric["rank"] == "0" and metric["local_rank"] == "0" and metric["split"] == "train"
        assert float(result[0]["value"][1]) > 0
        # Prometheus found the target healthy: every line parsed.
        (up,) = query('up{job="rankside"}')
        assert up["value"][1] == "1"


def test_names_ending_in_a_newline_are_refused_and_metrics_stays_valid(
    sidecar: SidecarProcess, spawn_worker: Any
) -> None:
    # "$" matches before a trailing newline: such names used to pass both ends
    # and put a line break into # HELP, which made promtool and Prometheus
    # refuse the whole node's scrape.
    worker = spawn_worker("careless_names_worker.py", rank=0)

    def good_pushed() -> str | None:
        text = sidecar.client.get("/metrics").text
        return text if "careless_good_total{" in text else None

    text: str = wait_for(good_pushed, timeout=20, what="the good metric")
    assert "nl_name" not in text and "nl_label" not in text
    promtool_check(text)
    log = worker.log()
    assert "refused 'nl_name\\n'" in log and "refused 'nl_label'" in log
    # A lone surrogate is refused at the call, naming the value, and the
    # worker's later frames still reach the sidecar.
    assert "refused help: documentation of 'surrogate_help'" in log
    assert "refused label value:" in log and "'data-\\udc80.bin'" in log
    paths = [
        s.labels for f in parse_text(text) for s in f.samples if s.name == "careless_paths_total"
    ]
    assert [p["path"] for p in paths] == ["7"]
    # NaN and +Inf are valid gauge values; bad counter and histogram amounts
    # are refused at the call, so the histogram's lowest bucket stays empty.
    assert "refused counter nan: " in log and "got nan" in log
    assert "refused counter negative: " in log and "got -1" in log
    assert "refused histogram nan: " in log
    assert "\ncareless_nan{" in text and " NaN\n" in text
    assert "\ncareless_inf{" in text and " +Inf\n" in text
    assert value(scrape(sidecar), "careless_hist_count", worker_labels(0)) == 0
