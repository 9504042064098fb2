"""The worker metrics API: validation, threads, the series limit and the payload."""

from __future__ import annotations

import json
import sys
import threading
import time
import types
from typing import Any

import pytest

import worker_hooks
from worker_hooks import metrics
from worker_hooks.metrics import MetricRegistry


def payload(registry: MetricRegistry, full: bool = True) -> dict[str, Any]:
    body = registry.collect_payload(full)
    assert body is not None
    result: dict[str, Any] = json.loads(body)
    return result


def values_by_name(registry: MetricRegistry) -> dict[tuple[str, tuple[str, ...]], Any]:
    """{(family name, label values): value} from a full payload."""
    data = payload(registry)
    names = {f[0]: f[1] for f in data["families"]}
    series = {s[0]: (names[s[1]], tuple(s[2])) for s in data["series"]}
    pairs = data["values"]
    return {series[pairs[i]]: pairs[i + 1] for i in range(0, len(pairs), 2)}


# -- naming and validation -------------------------------------------------------


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", "é", "rankside_mine"])
def test_invalid_metric_names(name: str) -> None:
    with pytest.raises(ValueError):
        MetricRegistry().counter(name, "doc")


@pytest.mark.parametrize(
    ("labels", "kind"),
    [
        (["__private"], "gauge"),
        (["rank"], "gauge"),
        (["local_rank"], "counter"),
        (["role"], "histogram"),
        (["le"], "histogram"),
        (["a-b"], "gauge"),
        (["1a"], "gauge"),
        (["a", "a"], "gauge"),
        ("method", "gauge"),
    ],
)
def test_invalid_label_names(labels: Any, kind: str) -> None:
    registry = MetricRegistry()
    with pytest.raises(ValueError):
        getattr(registry, kind)("m", "doc", labels)


def test_le_is_allowed_outside_histograms() -> None:
    MetricRegistry().gauge("g", "doc", ["le"])


def test_counter_total_suffix_is_implied() -> None:
    registry = MetricRegistry()
    first = registry.counter("requests_total", "doc")
    assert first.name == "requests"
    assert registry.counter("requests", "doc") is first


def test_same_shape_returns_same_object_other_shape_is_an_error() -> None:
    registry = MetricRegistry()
    gauge = registry.gauge("temperature", "doc", ["zone"])
    assert registry.gauge("temperature", "other words", ["zone"]) is gauge
    with pytest.raises(ValueError, match="already defined"):
        registry.gauge("temperature", "doc", ["room"])
    with pytest.raises(ValueError, match="already defined"):
        registry.counter("temperature", "doc", ["zone"])
    hist = registry.histogram("lat", "doc", buckets=[1, 2])
    assert registry.histogram("lat", "doc", buckets=[1.0, 2.0, float("inf")]) is hist
    with pytest.raises(ValueError, match="already defined"):
        registry.histogram("lat", "doc", buckets=[1, 3])


def test_clashing_sample_names_are_refused() -> None:
    registry = MetricRegistry()
    registry.counter("jobs", "doc")
    with pytest.raises(ValueError, match="jobs_total"):
        registry.gauge("jobs_total", "doc")
    registry.histogram("lat", "doc")
    with pytest.raises(ValueError, match="lat_sum"):
        registry.gauge("lat_sum", "doc")


@pytest.mark.parametrize("buckets", [[2, 1], [1, 1], [], [float("inf")], ["x"], [float("nan")]])
def test_bad_buckets(buckets: list[Any]) -> None:
    with pytest.raises(ValueError):
        MetricRegistry().histogram("h", "doc", buckets=buckets)


def test_histogram_appends_inf_bucket() -> None:
    assert MetricRegistry().histogram("h", "doc", buckets=[1, "2.5"]).buckets == (
        1.0,
        2.5,
        float("inf"),
    )


def test_documentation_must_be_a_string() -> None:
    with pytest.raises(TypeError):
        MetricRegistry().gauge("g", None)  # type: ignore[arg-type]


# -- updates ----------------------------------------------------------------------


def test_counter_only_goes_up() -> None:
    counter = MetricRegistry().counter("c", "doc")
    counter.inc()
    counter.inc(2.5)
    with pytest.raises(ValueError, match="non-negative"):
        counter.inc(-1)
    assert counter._value == 3.5


def test_labelled_metric_needs_labels_and_unlabelled_refuses_them() -> None:
    registry = MetricRegistry()
    labelled = registry.counter("c", "doc", ["a"])
    with pytest.raises(ValueError, match="missing label values"):
        labelled.inc()
    gauge = registry.gauge("g", "doc", ["a"])
    for method in (gauge.set, gauge.inc, gauge.dec):
        with pytest.raises(ValueError, match="missing label values"):
            method(1)
    with pytest.raises(ValueError, match="missing label values"):
        registry.histogram("h", "doc", ["a"]).observe(1)
    with pytest.raises(ValueError, match="No label names"):
        registry.gauge("plain", "doc").labels(a="x")


def test_labels_by_keyword_or_position_give_one_series() -> None:
    registry = MetricRegistry()
    family = registry.counter("c", "doc", ["method", "code"])
    child = family.labels(method="get", code=200)
    assert family.labels("get", "200") is child
    assert family.labels(code="200", method="get") is child
    assert family.labels(method="get", code=200) is child
    with pytest.raises(ValueError, match="Incorrect label names"):
        family.labels(method="get")
    with pytest.raises(ValueError, match="Incorrect label names"):
        family.labels(method="get", status="200")
    with pytest.raises(ValueError, match="Incorrect label count"):
        family.labels("get")
    with pytest.raises(ValueError, match="both"):
        family.labels("get", code="200")
    child.inc()
    assert values_by_name(registry) == {("c", ("get", "200")): 1.0}


def test_gauge_and_histogram_updates() -> None:
    registry = MetricRegistry()
    gauge = registry.gauge("g", "doc")
    gauge.set(5)
    gauge.inc(2)
    gauge.dec(0.5)
    hist = registry.histogram("h", "doc", buckets=[1, 2])
    for value in (0.5, 1, 1.5, 3):
        hist.observe(value)
    with hist.time():
        pass
    values = values_by_name(registry)
    assert values[("g", ())] == 6.5
    counts = values[("h", ())]
    assert counts[:3] == [3, 4, 5]
    assert counts[3] == pytest.approx(6.0, abs=0.01)


def test_updates_from_many_threads_are_exact() -> None:
    registry = MetricRegistry()
    counter = registry.counter("c", "doc", ["t"])
    plain = registry.counter("p", "doc")
    hist = registry.histogram("h", "doc", buckets=[1])
    shared = counter.labels(t="shared")
    threads, per_thread = 8, 20_000
    barrier = threading.Barrier(threads)

    def work() -> None:
        barrier.wait()
        for _ in range(per_thread):
            shared.inc()
            plain.inc(0.5)
            hist.observe(0.5)

    old = sys.getswitchinterval()
    # Hand the GIL over as often as the interpreter will, to provoke lost updates.
    sys.setswitchinterval(1e-6)
    try:
        workers = [threading.Thread(target=work) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    finally:
        sys.setswitchinterval(old)
    total = threads * per_thread
    values = values_by_name(registry)
    assert values[("c", ("shared",))] == total
    assert values[("p", ())] == total * 0.5
    assert values[("h", ())] == [total, total, total * 0.5]


def test_collect_while_threads_create_series() -> None:
    registry = MetricRegistry()
    family = registry.gauge("g", "doc", ["i"])
    stop = threading.Event()

    def create() -> None:
        i = 0
        while not stop.is_set() and i < registry.max_series:
            family.labels(i=i).set(i)
            i += 1

    thread = threading.Thread(target=create)
    thread.start()
    try:
        for _ in range(50):
            registry.collect_payload(full=False)
    finally:
        stop.set()
        thread.join()
    data = payload(registry)
    assert len(data["series"]) == registry.series_count


# -- the series limit -----------------------------------------------------------------


def test_series_limit_warns_once_and_counts_drops() -> None:
    registry = MetricRegistry(max_series=3)
    family = registry.counter("c", "doc", ["i"])
    with pytest.warns(RuntimeWarning, match="limit of 3"):
        for i in range(5):
            family.labels(i=i).inc()
    # No second warning, the same no-op child, and the drops are counted.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        overflow = family.labels(i=99)
    assert overflow is family.labels(i=100)
    assert registry.dropped_series == 4
    assert registry.series_count == 3
    data = payload(registry)
    assert data["dropped"] == 4
    assert len(data["series"]) == 3
    # Existing series keep working past the limit.
    family.labels(i=0).inc()
    assert values_by_name(registry)[("c", ("0",))] == 2.0


def test_the_series_limit_leaves_out_the_builtin_series() -> None:
    registry = MetricRegistry(max_series=3, builtins=True)
    assert registry.series_count > 0  # the step histogram and the process readings
    family = registry.counter("c", "doc", ["i"])
    for i in range(3):
        family.labels(i=i).inc()
    assert registry.dropped_series == 0
    with pytest.warns(RuntimeWarning, match="limit of 3"):
        family.labels(i=3).inc()
    assert registry.dropped_series == 1


def test_max_series_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANKSIDE_MAX_SERIES", "7")
    assert MetricRegistry().max_series == 7
    monkeypatch.setenv("RANKSIDE_MAX_SERIES", "lots")
    with pytest.warns(RuntimeWarning):
        assert MetricRegistry().max_series == metrics.DEFAULT_MAX_SERIES


# -- the payload -------------------------------------------------------------------------


def test_delta_payload_sends_only_changes() -> None:
    registry = MetricRegistry()
    counter = registry.counter("c", "doc", ["k"])
    counter.labels(k="a").inc()
    counter.labels(k="b").inc()
    first = payload(registry, full=False)
    assert len(first["families"]) == 1 and len(first["series"]) == 2
    assert registry.collect_payload(full=False) is None
    counter.labels(k="b").inc(2)
    second = payload(registry, full=False)
    assert second["families"] == [] and second["series"] == []
    assert second["values"] == [1, 3.0]
    # A full payload repeats everything, cumulative.
    full = payload(registry, full=True)
    assert full["full"] is True
    assert len(full["series"]) == 2 and full["values"] == [0, 1.0, 1, 3.0]


def test_builtins_are_collected_at_flush() -> None:
    registry = MetricRegistry(builtins=True)
    values = values_by_name(registry)
    assert values[("rankside_worker_cpu_seconds", ())] > 0
    assert values[("rankside_worker_resident_memory_bytes", ())] > 1_000_000
    assert ("rankside_worker_step_duration_seconds", ()) in values


def test_step_feeds_the_step_duration_histogram() -> None:
    histogram = metrics.REGISTRY.step_duration
    assert histogram is not None
    worker_hooks.step()
    before = histogram._read()
    time.sleep(0.03)
    worker_hooks.step()
    after = histogram._read()
    # Exactly one observation, of at least the 30 ms slept: the cumulative
    # count of the 0.025 s bucket stays, the +Inf one grows by one.
    assert after[-2] == before[-2] + 1
    assert after[1] == before[1]
    assert after[-1] - before[-1] >= 0.03


def test_cuda_memory_only_when_torch_already_uses_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = MetricRegistry(builtins=True)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    names = {name for name, _ in values_by_name(registry)}
    assert not any("cuda" in n for n in names)

    class FakeCuda:
        initialized = False

        def is_initialized(self) -> bool:
            return self.initialized

        def device_count(self) -> int:
            return 2

        def memory_reserved(self, device: int) -> int:
            return 4096 if device == 1 else 0

        def memory_allocated(self, device: int) -> int:
            return 1024

        def max_memory_allocated(self, device: int) -> int:
            return 2048

    fake = types.ModuleType("torch")
    fake.cuda = FakeCuda()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", fake)
    assert not any("cuda" in n for n, _ in values_by_name(registry))
    fake.cuda.initialized = True  # type: ignore[attr-defined]
    values = values_by_name(registry)
    assert values[("rankside_worker_cuda_memory_allocated_bytes", ("1",))] == 1024
    assert values[("rankside_worker_cuda_memory_reserved_bytes", ("1",))] == 4096
    assert values[("rankside_worker_cuda_memory_peak_bytes", ("1",))] == 2048
    assert ("rankside_worker_cuda_memory_allocated_bytes", ("0",)) not in values


def test_module_functions_use_the_default_registry() -> None:
    counter = metrics.counter("api_test_events_total", "doc")
    assert metrics.REGISTRY.get("api_test_events") is counter
    assert metrics.gauge("api_test_gauge", "doc") is metrics.REGISTRY.get("api_test_gauge")
    assert metrics.histogram("api_test_hist", "doc").buckets == metrics.DEFAULT_BUCKETS
