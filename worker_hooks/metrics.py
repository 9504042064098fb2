"""Worker-side metrics: counters, gauges and histograms that the sidecar exposes.

The API is shaped like prometheus_client's::

    from worker_hooks import metrics

    TOKENS = metrics.counter("tokens_processed", "Tokens seen by this rank", ["split"])
    LOSS = metrics.gauge("train_loss", "Loss of the last step")
    TOKENS.labels(split="train").inc(4096)
    LOSS.set(2.31)

An update is a plain in-process change of a Python attribute: no socket I/O and
no lock. The connection thread calls :meth:`MetricRegistry.collect_payload`
once per flush interval and sends the result as the body of a ``metrics``
frame; values are cumulative, so a sidecar that restarts and receives a full
payload loses no counts.

Names follow the rules in ``protocol``, which the sidecar applies too. The
labels ``rank``, ``local_rank`` and ``role`` are reserved: the sidecar adds
them to every series.

Standard library only, and nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import warnings
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from itertools import accumulate
from operator import itemgetter
from types import ModuleType
from typing import Any, NoReturn

from .protocol import (
    PAYLOAD_VERSION,
    sample_names,
    validate_labelnames,
    validate_metric_name,
)

__all__ = [
    "DEFAULT_BUCKETS",
    "DEFAULT_MAX_SERIES",
    "REGISTRY",
    "Counter",
    "CounterChild",
    "Gauge",
    "GaugeChild",
    "Histogram",
    "HistogramChild",
    "MetricRegistry",
    "counter",
    "gauge",
    "histogram",
]

DEFAULT_MAX_SERIES = 10_000
INF = math.inf
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, INF,
)  # fmt: skip

# Thread safety of the hot path. An update is ``self._value += amount`` on a
# slot holding a float. Under the GIL (CPython 3.10 to 3.13) the interpreter
# only hands the GIL over, or runs signal handlers, at its "eval breaker"
# checks, which sit on function entry, calls and backward jumps; a slot load,
# a float add and a slot store contain none of them and run no Python code, so
# no other thread can interleave and no increment is lost (tests hammer this
# with a 1 us switch interval). That costs 60 ns per Counter.inc against 230 ns
# with a threading.Lock around the same line, and 320 ns for prometheus_client's
# Counter.inc, measured with timeit on the project machine. Builds without a
# GIL have no such guarantee, so there every child takes a lock.
_FREE_THREADED = not getattr(sys, "_is_gil_enabled", lambda: True)()


def _max_series_from_env() -> int:
    # A bad value must not stop a training job from importing this module.
    raw = os.environ.get("RANKSIDE_MAX_SERIES", "")
    try:
        value = int(raw) if raw else DEFAULT_MAX_SERIES
    except ValueError:
        value = 0
    if value < 1:
        warnings.warn(
            f"rankside: ignoring RANKSIDE_MAX_SERIES={raw!r}, not a positive integer",
            RuntimeWarning,
            stacklevel=2,
        )
        return DEFAULT_MAX_SERIES
    return value


# --------------------------------------------------------------------------
# Children: one labelled series each; these objects are the hot path.
# --------------------------------------------------------------------------


class _Series:
    """What the registry keeps of every series besides its value."""

    __slots__ = ("_family", "_labelvalues", "_sent", "_sid")

    _family: _Family
    _labelvalues: tuple[str, ...]
    _sid: int
    _sent: Any

    def __init__(self, family: _Family, labelvalues: tuple[str, ...]) -> None:
        self._family = family
        self._labelvalues = labelvalues
        self._sid = -1
        self._sent = None
        self._init_value()

    def _init_value(self) -> None:
        raise NotImplementedError

    def _read(self) -> Any:
        """The value as sent on the wire; called from the flush thread."""
        raise NotImplementedError


class CounterChild(_Series):
    """One counter series: only goes up."""

    __slots__ = ("_value",)

    def _init_value(self) -> None:
        self._value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Increment by ``amount``, which must not be negative."""
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self._value += amount

    def _read(self) -> float:
        return float(self._value)


class GaugeChild(_Series):
    """One gauge series: goes up and down."""

    __slots__ = ("_value",)

    def _init_value(self) -> None:
        self._value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Increment by ``amount``."""
        self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        """Decrement by ``amount``."""
        self._value -= amount

    def set(self, value: float) -> None:
        """Set to ``value``."""
        self._value = float(value)

    def set_to_current_time(self) -> None:
        """Set to the current Unix time."""
        self._value = time.time()

    def _read(self) -> float:
        return float(self._value)


class HistogramChild(_Series):
    """One histogram series: per-bucket counts and a sum."""

    __slots__ = ("_bounds", "_counts", "_sum")

    _bounds: tuple[float, ...]

    def _init_value(self) -> None:
        self._bounds = self._family._bounds
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        """Record one observation of ``amount``."""
        # The bisect call comes first: the two updates after it contain no
        # call, so under the GIL they happen together (see _FREE_THREADED).
        i = bisect_left(self._bounds, amount)
        self._counts[i] += 1
        self._sum += amount

    def time(self) -> AbstractContextManager[None]:
        """Observe the duration of a ``with`` block, in seconds."""
        return self._timer()

    @contextmanager
    def _timer(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - start)

    def _read(self) -> list[float]:
        # One slice and one load with no call in between: a consistent copy.
        counts, total = self._counts[:], self._sum
        return [*accumulate(counts), float(total)]


# Free-threaded builds: the same classes, each update under a per-child lock.
class _LockedCounterChild(CounterChild):
    __slots__ = ("_lock",)

    def _init_value(self) -> None:
        super()._init_value()
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        with self._lock:
            self._value += amount


class _LockedGaugeChild(GaugeChild):
    __slots__ = ("_lock",)

    def _init_value(self) -> None:
        super()._init_value()
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value -= amount


class _LockedHistogramChild(HistogramChild):
    __slots__ = ("_lock",)

    def _init_value(self) -> None:
        super()._init_value()
        self._lock = threading.Lock()

    def observe(self, amount: float) -> None:
        i = bisect_left(self._bounds, amount)
        with self._lock:
            self._counts[i] += 1
            self._sum += amount

    def _read(self) -> list[float]:
        with self._lock:
            counts, total = self._counts[:], self._sum
        return [*accumulate(counts), float(total)]


# --------------------------------------------------------------------------
# Families: what counter(), gauge() and histogram() return.
# --------------------------------------------------------------------------


class _Family:
    """A named metric with fixed label names; holds its children."""

    _kind = ""
    _child_class: type[_Series] = _Series
    _reserved_labelnames: frozenset[str] = frozenset()

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        registry: MetricRegistry,
        bounds: tuple[float, ...] = (),
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = labelnames
        self._bounds = bounds
        self._registry = registry
        self._fid = -1
        # Keyed by the label values as the caller passed them, and also by
        # their str() form, so a repeat lookup is a single dict probe.
        self._children: dict[tuple[Any, ...], _Series] = {}
        self._overflow_child: _Series | None = None
        # kwargs -> label values in definition order, as one C call.
        getter = itemgetter(*labelnames) if labelnames else None
        if len(labelnames) == 1:
            self._values_of: Callable[[dict[str, Any]], tuple[Any, ...]] = lambda kw: (
                kw[labelnames[0]],
            )
        elif getter is not None:
            self._values_of = getter
        else:
            self._values_of = lambda kw: ()

    @property
    def name(self) -> str:
        """The metric's name as exposed (without ``_total`` for counters)."""
        return self._name

    @property
    def labelnames(self) -> tuple[str, ...]:
        return self._labelnames

    def _shape(self) -> tuple[Any, ...]:
        return (self._kind, self._labelnames, self._bounds)

    def _describe_shape(self) -> str:
        text = f"{self._kind} with labels {list(self._labelnames)!r}"
        return text + (f" and buckets {list(self._bounds)!r}" if self._bounds else "")

    def _definition(self) -> list[Any]:
        bounds = list(self._bounds) if self._bounds else None
        return [
            self._fid,
            self._name,
            self._kind,
            self._documentation,
            list(self._labelnames),
            bounds,
        ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r})"

    def _missing_labels(self) -> ValueError:
        return ValueError(f"{self._kind} metric {self._name!r} is missing label values")

    def _child(self, values: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs:
            if values or len(kwargs) != len(self._labelnames):
                self._raise_bad_labels(values, kwargs)
            try:
                values = self._values_of(kwargs)
            except KeyError:
                self._raise_bad_labels(values, kwargs)
        try:
            return self._children[values]
        except (KeyError, TypeError):
            return self._registry._new_child(self, values)

    def _raise_bad_labels(self, values: tuple[Any, ...], kwargs: dict[str, Any]) -> NoReturn:
        if not self._labelnames:
            raise ValueError(f"No label names were set when constructing {self!r}")
        if values:
            raise ValueError("Can't pass both *args and **kwargs")
        raise ValueError(
            f"Incorrect label names for {self!r}: expected {sorted(self._labelnames)}, "
            f"got {sorted(kwargs)}"
        )


class Counter(_Family):
    """A counter family; use :meth:`labels` to get a series, then ``inc()``."""

    _kind = "counter"
    _child_class = _LockedCounterChild if _FREE_THREADED else CounterChild

    def labels(self, *labelvalues: object, **labelkwargs: object) -> CounterChild:
        """The series for one set of label values, created on first use."""
        child: CounterChild = self._child(labelvalues, labelkwargs)
        return child

    def inc(self, amount: float = 1.0) -> None:
        """Increment a counter that has no labels."""
        raise self._missing_labels()


class Gauge(_Family):
    """A gauge family; use :meth:`labels` to get a series, then ``set()``."""

    _kind = "gauge"
    _child_class = _LockedGaugeChild if _FREE_THREADED else GaugeChild

    def labels(self, *labelvalues: object, **labelkwargs: object) -> GaugeChild:
        """The series for one set of label values, created on first use."""
        child: GaugeChild = self._child(labelvalues, labelkwargs)
        return child

    def inc(self, amount: float = 1.0) -> None:
        """Increment a gauge that has no labels."""
        raise self._missing_labels()

    def dec(self, amount: float = 1.0) -> None:
        """Decrement a gauge that has no labels."""
        raise self._missing_labels()

    def set(self, value: float) -> None:
        """Set a gauge that has no labels."""
        raise self._missing_labels()

    def set_to_current_time(self) -> None:
        """Set a gauge that has no labels to the current Unix time."""
        raise self._missing_labels()


class Histogram(_Family):
    """A histogram family; use :meth:`labels` to get a series, then ``observe()``."""

    _kind = "histogram"
    _child_class = _LockedHistogramChild if _FREE_THREADED else HistogramChild
    _reserved_labelnames = frozenset({"le"})

    @property
    def buckets(self) -> tuple[float, ...]:
        """Upper bounds, ending with +Inf."""
        return self._bounds

    def labels(self, *labelvalues: object, **labelkwargs: object) -> HistogramChild:
        """The series for one set of label values, created on first use."""
        child: HistogramChild = self._child(labelvalues, labelkwargs)
        return child

    def observe(self, amount: float) -> None:
        """Observe into a histogram that has no labels."""
        raise self._missing_labels()

    def time(self) -> AbstractContextManager[None]:
        """Time a block into a histogram that has no labels."""
        raise self._missing_labels()


# A metric without labels is its own single series. The child class comes
# first in the bases, so ``inc()`` resolves straight to the child's method
# and costs no more than on a labelled child.
class _PlainCounter(CounterChild, Counter):
    pass


class _PlainGauge(GaugeChild, Gauge):
    pass


class _PlainHistogram(HistogramChild, Histogram):
    pass


class _LockedPlainCounter(_LockedCounterChild, Counter):
    pass


class _LockedPlainGauge(_LockedGaugeChild, Gauge):
    pass


class _LockedPlainHistogram(_LockedHistogramChild, Histogram):
    pass


_PLAIN: dict[type[_Family], type[_Family]] = {
    Counter: _LockedPlainCounter if _FREE_THREADED else _PlainCounter,
    Gauge: _LockedPlainGauge if _FREE_THREADED else _PlainGauge,
    Histogram: _LockedPlainHistogram if _FREE_THREADED else _PlainHistogram,
}


def _prepare_buckets(source: Sequence[float | str]) -> tuple[float, ...]:
    try:
        bounds = [float(b) for b in source]
    except (TypeError, ValueError):
        raise ValueError(f"Histogram buckets must be numbers, got {list(source)!r}") from None
    if any(math.isnan(b) for b in bounds):
        raise ValueError("Histogram buckets must not be NaN")
    if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
        raise ValueError("Buckets not in sorted order")
    if bounds and bounds[-1] != INF:
        bounds.append(INF)
    if len(bounds) < 2:
        raise ValueError("Must have at least two buckets")
    return tuple(bounds)


# --------------------------------------------------------------------------
# The registry: definitions, the series limit, and payloads for the sidecar.
# --------------------------------------------------------------------------


class MetricRegistry:
    """All metric families of one worker process, and their wire encoding."""

    def __init__(self, max_series: int | None = None, builtins: bool = False) -> None:
        self.max_series = _max_series_from_env() if max_series is None else max_series
        self._lock = threading.Lock()
        self._families: list[_Family] = []
        self._by_name: dict[str, _Family] = {}
        self._sample_names: dict[str, str] = {}
        # Append-only, in creation order; a series' id is its index here.
        self._series: list[_Series] = []
        self._dropped = 0
        self._warned = False
        # collect_payload runs on one thread at a time; this also guards
        # the bookkeeping of what was already sent.
        self._collect_lock = threading.Lock()
        self._sent_families = 0
        self._sent_series = 0
        self._sent_dropped = 0
        self._hooks: list[Callable[[], None]] = []
        # The step() histogram; None in a registry made without built-ins.
        self.step_duration: HistogramChild | None = _install_builtins(self) if builtins else None

    # -- definitions --------------------------------------------------------

    def counter(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> Counter:
        """Define (or get back) a counter. A ``_total`` suffix is implied."""
        if isinstance(name, str) and name.endswith("_total"):
            name = name[: -len("_total")]
        family = self._define(Counter, name, documentation, labelnames)
        assert isinstance(family, Counter)
        return family

    def gauge(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> Gauge:
        """Define (or get back) a gauge."""
        family = self._define(Gauge, name, documentation, labelnames)
        assert isinstance(family, Gauge)
        return family

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        buckets: Sequence[float | str] = DEFAULT_BUCKETS,
    ) -> Histogram:
        """Define (or get back) a histogram with the given bucket upper bounds."""
        bounds = _prepare_buckets(buckets)
        family = self._define(Histogram, name, documentation, labelnames, bounds)
        assert isinstance(family, Histogram)
        return family

    def _define(
        self,
        cls: type[_Family],
        name: str,
        documentation: str,
        labelnames: Iterable[str],
        bounds: tuple[float, ...] = (),
        reserved_ok: bool = False,
    ) -> _Family:
        name = validate_metric_name(name, reserved_ok)
        if not isinstance(documentation, str):
            raise TypeError(f"documentation of {name!r} must be a string")
        names = validate_labelnames(labelnames, cls._reserved_labelnames)
        with self._lock:
            existing = self._by_name.get(name)
            if existing is not None:
                # The same definition twice (say, in a module imported by
                # two code paths) gets the same object back.
                if existing._shape() == (cls._kind, names, bounds):
                    return existing
                raise ValueError(
                    f"Metric {name!r} is already defined as {existing._describe_shape()}; "
                    f"it cannot be defined again as {cls._kind} with labels {list(names)!r}"
                    + (f" and buckets {list(bounds)!r}" if bounds else "")
                )
            samples = sample_names(name, cls._kind)
            clashes = sorted(s for s in samples if s in self._sample_names)
            if clashes:
                owners = sorted({self._sample_names[s] for s in clashes})
                raise ValueError(
                    f"Metric {name!r} would produce series {clashes!r}, which metric(s) "
                    f"{owners!r} already produce"
                )
            if names:
                family = cls(name, documentation, names, self, bounds)
            else:
                plain = _PLAIN[cls]
                family = plain.__new__(plain)
                _Family.__init__(family, name, documentation, names, self, bounds)
                assert isinstance(family, _Series)
                _Series.__init__(family, family, ())
                # One series per definition, so the series limit does not apply.
                self._register_series(family)
            family._fid = len(self._families)
            self._families.append(family)
            self._by_name[name] = family
            for sample in samples:
                self._sample_names[sample] = name
            return family

    # -- series ---------------------------------------------------------------

    def _register_series(self, child: _Series) -> None:
        child._sid = len(self._series)
        self._series.append(child)

    def _new_child(self, family: _Family, raw: tuple[Any, ...]) -> _Series:
        """Slow path of ``labels()``: validate, then create or find the series."""
        names = family._labelnames
        if not names:
            family._raise_bad_labels(raw, {})
        if len(raw) != len(names):
            raise ValueError(
                f"Incorrect label count for {family!r}: expected {len(names)}, got {len(raw)}"
            )
        values = tuple(str(v) for v in raw)
        with self._lock:
            child = family._children.get(values)
            if child is None:
                if len(self._series) >= self.max_series:
                    return self._overflow(family)
                child = family._child_class(family, values)
                self._register_series(child)
                family._children[values] = child
            # Also remember the caller's own spelling (say an int), so the next
            # lookup with it is a single probe; unhashable values cannot be.
            with suppress(TypeError):
                family._children.setdefault(raw, child)
            return child

    def _overflow(self, family: _Family) -> _Series:
        """A series that is never sent: what ``labels()`` gives past the limit."""
        self._dropped += 1
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"rankside: this worker reached its limit of {self.max_series} metric series "
                f"(RANKSIDE_MAX_SERIES); new label sets of {family.name!r} and other metrics are "
                "dropped and counted in rankside_worker_dropped_series_total",
                RuntimeWarning,
                stacklevel=4,
            )
        if family._overflow_child is None:
            family._overflow_child = family._child_class(family, ("",) * len(family._labelnames))
        return family._overflow_child

    @property
    def dropped_series(self) -> int:
        """How many ``labels()`` lookups were refused because of the series limit."""
        return self._dropped

    @property
    def series_count(self) -> int:
        return len(self._series)

    def get(self, name: str) -> _Family | None:
        """The family defined under ``name`` (counters without ``_total``), if any."""
        return self._by_name.get(name)

    def add_collect_hook(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` at the start of every collection, on the flush thread.

        This is how values that are sampled rather than counted (CPU time,
        memory) stay off the hot path.
        """
        self._hooks.append(hook)

    # -- the wire -------------------------------------------------------------

    def collect_payload(self, full: bool) -> bytes | None:
        """The body of a ``metrics`` frame, or None when nothing changed.

        ``full`` sends every definition and value, as the sidecar needs after a
        (re)connect; otherwise only new definitions and changed values are sent.

        The body is a ``protocol.MetricsPayload``, whose docstring and
        docs/protocol.md specify it.
        """
        with self._collect_lock:
            for hook in self._hooks:
                try:
                    hook()
                except Exception as exc:  # a broken probe must not stop the flushes
                    warnings.warn(
                        f"rankside: metrics collect hook failed: {exc!r}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            with self._lock:
                families = self._families[:]
                series = self._series[:]
            first_family = 0 if full else self._sent_families
            first_series = 0 if full else self._sent_series
            new_families = [f._definition() for f in families[first_family:]]
            new_series = [
                [s._sid, s._family._fid, list(s._labelvalues)] for s in series[first_series:]
            ]
            values: list[Any] = []
            for child in series:
                value = child._read()
                if full or value != child._sent:
                    child._sent = value
                    values.append(child._sid)
                    values.append(value)
            dropped = self._dropped
            changed = new_families or new_series or values or dropped != self._sent_dropped
            self._sent_families = len(families)
            self._sent_series = len(series)
            self._sent_dropped = dropped
            if not full and not changed:
                return None
            body = {
                "v": PAYLOAD_VERSION,
                "full": full,
                "families": new_families,
                "series": new_series,
                "values": values,
                "dropped": dropped,
            }
            return json.dumps(body, separators=(",", ":")).encode()


# --------------------------------------------------------------------------
# Built-in series of every worker.
# --------------------------------------------------------------------------

STEP_DURATION_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, INF,
)  # fmt: skip


def _install_builtins(registry: MetricRegistry) -> HistogramChild:
    """Define the per-worker built-ins; returns the step-duration histogram."""
    define = registry._define
    step = define(
        Histogram,
        "rankside_worker_step_duration_seconds",
        "Time between two consecutive step() calls of the worker.",
        (),
        STEP_DURATION_BUCKETS,
        reserved_ok=True,
    )
    cpu = define(
        Counter,
        "rankside_worker_cpu_seconds",
        "User and system CPU time of the worker process.",
        (),
        reserved_ok=True,
    )
    rss = define(
        Gauge,
        "rankside_worker_resident_memory_bytes",
        "Resident memory of the worker process.",
        (),
        reserved_ok=True,
    )
    assert isinstance(step, HistogramChild)
    assert isinstance(cpu, CounterChild) and isinstance(rss, GaugeChild)
    page_size = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def sample_process() -> None:
        times = os.times()
        # Counters only go up; CPU time of a live process does too.
        cpu._value = max(cpu._value, times.user + times.system)
        rss_bytes = _resident_bytes(page_size)
        if rss_bytes is not None:
            rss._value = float(rss_bytes)

    registry.add_collect_hook(sample_process)
    registry.add_collect_hook(_CudaSampler(registry))
    return step


def _resident_bytes(page_size: int) -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * page_size
    except (OSError, ValueError, IndexError):
        return None


class _CudaSampler:
    """CUDA memory per device, read only if the program already uses CUDA.

    Importing torch here would add seconds to every worker's start-up and
    calling into CUDA before the program does would create a context, so the
    sampler looks for a torch module that is already imported with CUDA
    initialised. Only devices this process has memory reserved on are
    reported, so eight ranks on eight GPUs give eight series, not 64.
    """

    def __init__(self, registry: MetricRegistry) -> None:
        define = registry._define
        labels = ("device",)
        self._allocated = define(
            Gauge, "rankside_worker_cuda_memory_allocated_bytes",
            "CUDA memory occupied by tensors of the worker, per device.", labels,
            reserved_ok=True)  # fmt: skip
        self._reserved = define(
            Gauge, "rankside_worker_cuda_memory_reserved_bytes",
            "CUDA memory held by the worker's caching allocator, per device.", labels,
            reserved_ok=True)  # fmt: skip
        self._peak = define(
            Gauge, "rankside_worker_cuda_memory_peak_bytes",
            "Peak CUDA memory occupied by tensors of the worker, per device.", labels,
            reserved_ok=True)  # fmt: skip
        self._seen: set[int] = set()

    def __call__(self) -> None:
        torch: ModuleType | None = sys.modules.get("torch")
        cuda = getattr(torch, "cuda", None)
        if cuda is None or not cuda.is_initialized():
            return
        for device in range(cuda.device_count()):
            reserved = cuda.memory_reserved(device)
            if not reserved and device not in self._seen:
                continue
            self._seen.add(device)
            for family, value in (
                (self._allocated, cuda.memory_allocated(device)),
                (self._reserved, reserved),
                (self._peak, cuda.max_memory_allocated(device)),
            ):
                assert isinstance(family, Gauge)
                family.labels(device=str(device)).set(value)


REGISTRY = MetricRegistry(builtins=True)
"""The registry of this worker process, which the connection thread flushes."""


def counter(name: str, documentation: str, labelnames: Iterable[str] = ()) -> Counter:
    """Define a counter in the worker's registry (or get back the same one)."""
    return REGISTRY.counter(name, documentation, labelnames)


def gauge(name: str, documentation: str, labelnames: Iterable[str] = ()) -> Gauge:
    """Define a gauge in the worker's registry (or get back the same one)."""
    return REGISTRY.gauge(name, documentation, labelnames)


def histogram(
    name: str,
    documentation: str,
    labelnames: Iterable[str] = (),
    buckets: Sequence[float | str] = DEFAULT_BUCKETS,
) -> Histogram:
    """Define a histogram in the worker's registry (or get back the same one)."""
    return REGISTRY.histogram(name, documentation, labelnames, buckets)
