"""The sidecar's metric store and /metrics rendering, checked by real parsers.

Payloads come from the worker API itself, so these tests cover the round trip
worker -> payload -> store -> exposition, parsed back by prometheus_client's
text and OpenMetrics parsers and by ``promtool check metrics``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text
from scrape import OPENMETRICS_ACCEPT, promtool_check

from sidecar.metrics.exposition import (
    CONTENT_TYPE_OPENMETRICS,
    CONTENT_TYPE_TEXT,
    Exposition,
    negotiate,
    reserved_sample_names,
)
from sidecar.metrics.payload import MetricsPayloadError
from sidecar.metrics.store import MetricStore
from sidecar.node.workers import Worker, WorkerTable
from sidecar.schema import WorkerState
from worker_hooks.metrics import MetricRegistry


def labels_of(rank: int, role: str = "trainer") -> dict[str, str]:
    return {"rank": str(rank), "local_rank": str(rank % 8), "role": role}


def samples(text: str, openmetrics: bool = False) -> dict[tuple[str, frozenset[Any]], float]:
    parse = parse_openmetrics if openmetrics else parse_text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in parse(text)
        for s in family.samples
    }


def text_of(store: MetricStore, openmetrics: bool) -> str:
    return store.render_workers(openmetrics).decode()


def example_registry() -> MetricRegistry:
    registry = MetricRegistry()
    requests = registry.counter("requests_total", 'Requests, "quoted" \\ and\nsplit', ["method"])
    requests.labels(method="get").inc(3)
    requests.labels(method='we"ird\\va\nlue').inc()
    registry.gauge("temperature", "Temperature").set(-2.5)
    registry.gauge("infinite", "Infinite").set(math.inf)
    latency = registry.histogram("latency_seconds", "Latency", ["op"], buckets=[0.1, 1])
    for value in (0.05, 0.5, 5):
        latency.labels(op="read").observe(value)
    return registry


def store_of(*registries: MetricRegistry) -> MetricStore:
    store = MetricStore(reserved_sample_names())
    for rank, registry in enumerate(registries):
        body = registry.collect_payload(full=True)
        assert body is not None
        store.ingest(str(rank), labels_of(rank), body)
    return store


# -- round trip ---------------------------------------------------------------------


@pytest.mark.parametrize("openmetrics", [False, True])
def test_round_trip_through_prometheus_parsers(openmetrics: bool) -> None:
    store = store_of(example_registry(), example_registry())
    text = text_of(store, openmetrics) + ("# EOF\n" if openmetrics else "")
    found = samples(text, openmetrics)
    for rank in ("0", "1"):
        worker = {("rank", rank), ("local_rank", rank), ("role", "trainer")}
        assert found[("requests_total", frozenset({*worker, ("method", "get")}))] == 3
        assert found[("requests_total", frozenset({*worker, ("method", 'we"ird\\va\nlue')}))] == 1
        assert found[("temperature", frozenset(worker))] == -2.5
        assert found[("infinite", frozenset(worker))] == math.inf
        read = {*worker, ("op", "read")}
        assert found[("latency_seconds_bucket", frozenset({*read, ("le", "0.1")}))] == 1
        assert found[("latency_seconds_bucket", frozenset({*read, ("le", "1.0")}))] == 2
        assert found[("latency_seconds_bucket", frozenset({*read, ("le", "+Inf")}))] == 3
        assert found[("latency_seconds_count", frozenset(read))] == 3
        assert found[("latency_seconds_sum", frozenset(read))] == pytest.approx(5.55)
    families = {f.name: f for f in (parse_openmetrics if openmetrics else parse_text)(text)}
    assert families["requests"].documentation == ('Requests, "quoted" \\ and\nsplit')
    if not openmetrics:
        promtool_check(text)


def test_help_and_type_once_per_family_for_64_workers() -> None:
    store = store_of(*(example_registry() for _ in range(64)))
    text = text_of(store, False)
    assert text.count("# TYPE requests_total counter\n") == 1
    assert text.count("# HELP latency_seconds ") == 1
    assert text.count("requests_total{") == 128
    promtool_check(text)
    om = text_of(store, True)
    assert om.count("# TYPE requests counter\n") == 1
    assert len(list(parse_openmetrics(om + "# EOF\n"))) == 4


def test_delta_payloads_update_and_rendering_is_cached() -> None:
    registry = example_registry()
    store = store_of(registry)
    first = store.render_workers(False)
    assert store.render_workers(False) is first  # cached until the next payload
    registry.get("temperature").set(7)  # type: ignore[union-attr]
    registry.counter("fresh_total", "new family", ["k"]).labels(k="v").inc()
    body = registry.collect_payload(full=False)
    assert body is not None
    delta = json.loads(body)
    assert len(delta["families"]) == 1 and len(delta["values"]) == 4
    store.ingest("0", labels_of(0), body)
    found = samples(text_of(store, False))
    worker = frozenset({("rank", "0"), ("local_rank", "0"), ("role", "trainer")})
    assert found[("temperature", worker)] == 7
    assert found[("fresh_total", worker | {("k", "v")})] == 1
    assert found[("requests_total", worker | {("method", "get")})] == 3


def test_full_payload_replaces_a_workers_series() -> None:
    old = example_registry()
    store = store_of(old)
    replacement = MetricRegistry()
    replacement.gauge("only_this", "doc").set(1)
    store.ingest("0", labels_of(0), replacement.collect_payload(full=True) or b"")
    text = text_of(store, False)
    assert "only_this{" in text and "requests_total{" not in text


def test_forget() -> None:
    store = store_of(example_registry(), example_registry(), example_registry())
    store.forget("1")
    assert store.keys() == ["0", "2"]
    assert 'rank="1"' not in text_of(store, False)
    assert 'rank="2"' in text_of(store, False)


@settings(max_examples=60, deadline=None)
@given(
    value=st.text(min_size=0, max_size=20),
    number=st.floats(allow_nan=False, allow_infinity=True),
)
def test_any_label_value_and_number_survive_both_formats(value: str, number: float) -> None:
    registry = MetricRegistry()
    registry.gauge("g", "doc", ["v"]).labels(v=value).set(number)
    store = store_of(registry)
    worker = {("rank", "0"), ("local_rank", "0"), ("role", "trainer")}
    key = ("g", frozenset({*worker, ("v", value)}))
    assert samples(text_of(store, False))[key] == number
    assert samples(text_of(store, True) + "# EOF\n", openmetrics=True)[key] == number


# -- conflicts -------------------------------------------------------------------------


def test_conflicting_definitions_are_counted_and_hidden() -> None:
    a, b, c = MetricRegistry(), MetricRegistry(), MetricRegistry()
    a.counter("jobs", "doc", ["kind"]).labels(kind="x").inc()
    b.gauge("jobs", "doc", ["kind"]).labels(kind="x").set(5)
    c.counter("jobs", "doc", ["queue"]).labels(queue="q").inc()
    same = MetricRegistry()
    same.counter("jobs", "doc", ["kind"]).labels(kind="y").inc()
    store = store_of(a, b, c, same)
    assert store.hidden == {("1", "jobs"), ("2", "jobs")}
    assert store.conflicts == 2
    text = text_of(store, False)
    promtool_check(text)
    ranks = {dict(k[1])["rank"] for k in samples(text)}
    assert ranks == {"0", "3"}
    # Once the first definer is gone, the next in line wins.
    store.forget("0")
    assert ("1", "jobs") not in store.hidden
    assert ("3", "jobs") in store.hidden


def test_label_order_is_not_a_conflict() -> None:
    a, b = MetricRegistry(), MetricRegistry()
    a.gauge("g", "doc", ["x", "y"]).labels(x="1", y="2").set(1)
    b.gauge("g", "doc", ["y", "x"]).labels(y="2", x="1").set(2)
    store = store_of(a, b)
    assert store.hidden == set()
    assert len(samples(text_of(store, False))) == 2


def test_families_whose_series_collide_are_conflicts() -> None:
    a, b, c = MetricRegistry(), MetricRegistry(), MetricRegistry()
    a.gauge("latency_count", "doc").set(1)
    b.histogram("latency", "doc").observe(1)
    # The sidecar's own process_cpu_seconds_total is taken too.
    c.counter("process_cpu_seconds", "doc").inc()
    store = store_of(a, b, c)
    assert store.hidden == {("1", "latency"), ("2", "process_cpu_seconds")}
    promtool_check(text_of(store, False), lint=False)


# -- malformed payloads --------------------------------------------------------------------


def _full(**overrides: Any) -> bytes:
    body: dict[str, Any] = {
        "v": 1,
        "full": True,
        "families": [[0, "g", "gauge", "doc", ["a"], None]],
        "series": [[0, 0, ["x"]]],
        "values": [0, 1.0],
        "dropped": 0,
    }
    body.update(overrides)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        _full(v=2),
        _full(full="yes"),
        _full(dropped=-1),
        _full(families=[[0, "bad name", "gauge", "doc", [], None]]),
        _full(families=[[0, "nl_name\n", "gauge", "doc", [], None]]),
        _full(families=[[0, "g", "gauge", "doc", ["kind\n"], None]]),
        _full(families=[[0, "rankside_worker_up", "gauge", "doc", [], None]]),
        _full(families=[[0, "g", "summary", "doc", [], None]]),
        _full(families=[[0, "g_total", "counter", "doc", [], None]]),
        _full(families=[[0, "g", "gauge", "doc", ["rank"], None]]),
        _full(families=[[0, "g", "gauge", "doc", ["a", "a"], None]]),
        _full(families=[[0, "h", "histogram", "doc", ["le"], [1, math.inf]]]),
        _full(families=[[0, "h", "histogram", "doc", [], [2, 1, math.inf]]]),
        _full(families=[[0, "h", "histogram", "doc", [], [1, 2]]]),
        _full(families=[[0, "g", "gauge", "doc", [], [1, math.inf]]]),
        _full(families=[[0, "g", "gauge", "doc", ["a"], None]] * 2),
        _full(series=[[0, 5, ["x"]]]),
        _full(series=[[0, 0, ["x", "y"]]]),
        _full(series=[[0, 0, [1]]]),
        _full(series=[[0, 0, ["\udc80"]]]),
        _full(families=[[0, "g", "gauge", "doc \udc80", ["a"], None]]),
        _full(series=[[0, 0, ["x"]], [1, 0, ["x"]]]),
        _full(values=[0]),
        _full(values=[9, 1.0]),
        _full(values=[0, "1"]),
        _full(values=[0, True]),
    ],
)
def test_malformed_payloads_are_refused_without_changes(body: bytes) -> None:
    store = store_of(example_registry())
    before = text_of(store, False)
    with pytest.raises(MetricsPayloadError):
        store.ingest("0", labels_of(0), body)
    assert text_of(store, False) == before


@pytest.mark.parametrize(
    "value", [[1, 2], [2, 1, 0.5], [1, 2.5, 0.5], [-1, 1, 0.5], "x", [1, 1, "s"]]
)
def test_malformed_histogram_values(value: Any) -> None:
    body = _full(
        families=[[0, "h", "histogram", "doc", [], [1, math.inf]]],
        series=[[0, 0, []]],
        values=[0, value],
    )
    with pytest.raises(MetricsPayloadError):
        MetricStore().ingest("0", labels_of(0), body)


def test_first_payload_must_be_full() -> None:
    with pytest.raises(MetricsPayloadError, match="full"):
        MetricStore().ingest("0", labels_of(0), _full(full=False))


# -- the /metrics response -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "openmetrics", "content_type"),
    [
        ("", False, CONTENT_TYPE_TEXT),
        ("text/plain", False, CONTENT_TYPE_TEXT),
        (OPENMETRICS_ACCEPT, True, CONTENT_TYPE_OPENMETRICS),
        ("application/openmetrics-text", True, CONTENT_TYPE_OPENMETRICS),
        ("application/openmetrics-text; version=0.0.1", False, CONTENT_TYPE_TEXT),
    ],
)
def test_negotiation(accept: str, openmetrics: bool, content_type: str) -> None:
    assert negotiate(accept) == (openmetrics, content_type)


def worker_state(rank: int | None, pid: int, **changes: Any) -> Worker:
    identity = {
        "rank": rank,
        "local_rank": rank,
        "role": "trainer",
        "pid": pid,
        "hostname": 'node"1',
        "run_id": "job-7",
        "restart_count": 2,
    }
    worker = Worker.from_hello(identity, [], 1000.0)
    for name, value in changes.items():
        setattr(worker, name, value)
    return worker


def scrape(exposition: Exposition, accept: str = "", encoding: str = "") -> tuple[str, Any]:
    result = asyncio.run(exposition.scrape(accept, encoding))
    body = gzip.decompress(result.body) if result.gzipped else result.body
    return body.decode(), result


def test_scrape_has_builtins_workers_and_self_metrics() -> None:
    workers = WorkerTable(grace=300)
    running = worker_state(0, 100, step=41, progress_time=1_700_000_000.5)
    ended = worker_state(1, 101)
    anonymous = worker_state(None, 102)
    for worker in (running, ended, anonymous):
        workers.register(worker)
    workers.end(ended, WorkerState.EXITED, 1e12)  # far future: stays within grace
    work = MetricRegistry(max_series=1)
    family = work.counter("tokens", "Tokens", ["split"])
    with pytest.warns(RuntimeWarning):
        for split in ("a", "b", "c"):
            family.labels(split=split).inc()
    store = MetricStore(reserved_sample_names())
    store.ingest("0", {"rank": "0", "local_rank": "0", "role": "trainer"},
                 work.collect_payload(full=True) or b"")  # fmt: skip
    exposition = Exposition(store, workers.all)

    text, result = scrape(exposition, encoding="gzip, deflate")
    assert result.gzipped and result.content_type == CONTENT_TYPE_TEXT
    promtool_check(text)
    found = samples(text)
    zero = {("rank", "0"), ("local_rank", "0"), ("role", "trainer")}
    one = {("rank", "1"), ("local_rank", "1"), ("role", "trainer")}
    anon = {("rank", f"pid-{anonymous.pid}"), ("local_rank", ""), ("role", "trainer")}
    assert found[("rankside_worker_up", frozenset(zero))] == 1
    assert found[("rankside_worker_up", frozenset(one))] == 0
    assert found[("rankside_worker_up", frozenset(anon))] == 1
    info = zero | {("pid", "100"), ("run_id", "job-7"), ("hostname", 'node"1')}
    assert found[("rankside_worker_info", frozenset(info))] == 1
    assert found[("rankside_worker_restarts_total", frozenset(zero))] == 2
    assert found[("rankside_worker_step", frozenset(zero))] == 41
    assert ("rankside_worker_step", frozenset(one)) not in found
    assert found[("rankside_worker_last_progress_timestamp_seconds", frozenset(zero))] == (
        1_700_000_000.5
    )
    assert found[("rankside_worker_dropped_series_total", frozenset(zero))] == 2
    assert found[("tokens_total", frozenset(zero | {("split", "a")}))] == 1
    assert found[("rankside_workers_connected", frozenset())] == 2
    assert ("rankside_frames_rejected_total", frozenset({("reason", "bad_metrics")})) in found
    assert any(name == "process_cpu_seconds_total" for name, _ in found)

    om, result = scrape(exposition, accept=OPENMETRICS_ACCEPT)
    assert not result.gzipped and result.content_type == CONTENT_TYPE_OPENMETRICS
    assert om.endswith("# EOF\n") and om.count("# EOF") == 1
    names = [f.name for f in parse_openmetrics(om)]
    assert len(names) == len(set(names))
    assert "rankside_worker_restarts" in names and "rankside_scrape_duration_seconds" in names


def test_rendering_on_a_thread_while_payloads_arrive() -> None:
    registries = [example_registry() for _ in range(8)]
    store = store_of(*registries)
    errors: list[BaseException] = []
    stop = threading.Event()

    def render() -> None:
        try:
            while not stop.is_set():
                list(parse_text(text_of(store, False)))
        except BaseException as exc:
            errors.append(exc)
            raise

    thread = threading.Thread(target=render)
    thread.start()
    try:
        for round_ in range(200):
            for rank, registry in enumerate(registries):
                registry.get("temperature").set(round_)  # type: ignore[union-attr]
                registry.get("latency_seconds").labels(op="read").observe(round_)  # type: ignore[union-attr]
                body = registry.collect_payload(full=round_ % 50 == 0)
                if body is not None:
                    store.ingest(str(rank), labels_of(rank), body)
    finally:
        stop.set()
        thread.join()
    assert errors == []


def test_a_collection_over_the_frame_limit_is_split_into_payloads_the_store_applies() -> None:
    """The sidecar's --max-frame below one push: every piece valid, nothing lost but what
    alone cannot fit a frame, which is left out with its series for good."""
    registry = MetricRegistry()
    many = registry.counter("many", "Many series.", ["item"])
    for i in range(500):
        many.labels(item=f"item-{i:04d}").inc(i)
    registry.gauge("huge_help", "h" * 10_000).set(1)
    store = MetricStore(reserved_sample_names())
    with pytest.warns(RuntimeWarning) as caught:
        bodies = registry.collect_payloads(full=True, limit=4096)
    assert len(bodies) > 3 and all(len(body) <= 4096 for body in bodies)
    assert [json.loads(body)["full"] for body in bodies] == [True] + [False] * (len(bodies) - 1)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages
    assert "left out metric 'huge_help'" in messages[0]
    assert f"sending it in {len(bodies)} frames" in messages[1]
    for body in bodies:
        store.ingest("0", labels_of(0), body)
    text = text_of(store, openmetrics=False)
    got = samples(text)
    assert len([key for key in got if key[0] == "many_total"]) == 500
    assert got[("many_total", frozenset({**labels_of(0), "item": "item-0499"}.items()))] == 499
    assert "huge_help" not in text
    # Later pushes leave the gauge out too, and the store takes them.
    for i in range(500):
        many.labels(item=f"item-{i:04d}").inc()
    for body in registry.collect_payloads(full=False, limit=4096):
        store.ingest("0", labels_of(0), body)
    got = samples(text_of(store, openmetrics=False))
    assert got[("many_total", frozenset({**labels_of(0), "item": "item-0499"}.items()))] == 500
