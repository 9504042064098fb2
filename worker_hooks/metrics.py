"""Worker-side metric objects, shaped like prometheus_client's: counters, gauges and histograms
whose every update is a plain change of a Python attribute in the training process (no I/O,
no lock under the GIL), the ``MetricRegistry`` they are defined in, and this process's own
``REGISTRY`` with the ``counter()``, ``gauge()`` and ``histogram()`` that define metrics in it.
The connection thread flushes ``REGISTRY`` (see ``registry``); names follow the rules in
``protocol``, and the labels ``rank``, ``local_rank`` and ``role`` are the sidecar's.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from itertools import accumulate
from operator import itemgetter
from typing import Any, ClassVar, Generic, NoReturn, TypeVar, cast

from . import collectors
from .protocol import MetricType, validate_text
from .registry import DEFAULT_MAX_SERIES, Family, Series, SeriesRegistry

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

INF = math.inf
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, INF,
)  # fmt: skip
STEP_DURATION_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, INF,
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


# --------------------------------------------------------------------------
# Children: one labelled series each; these objects are the hot path.
# --------------------------------------------------------------------------


class CounterChild(Series):
    """One counter series: only goes up."""

    __slots__ = ("_value",)

    def __init__(self, family: Family, labelvalues: tuple[str, ...]) -> None:
        super().__init__(family, labelvalues)
        self._value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Increment by ``amount``, which must not be negative."""
        # "not >=" also refuses NaN, which would leave the counter NaN for good.
        if not amount >= 0:
            raise ValueError(
                f"Counters can only be incremented by non-negative amounts, got {amount!r}"
            )
        self._value += amount

    def _read(self) -> float:
        return float(self._value)


class GaugeChild(Series):
    """One gauge series: goes up and down."""

    __slots__ = ("_value",)

    def __init__(self, family: Family, labelvalues: tuple[str, ...]) -> None:
        super().__init__(family, labelvalues)
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


class HistogramChild(Series):
    """One histogram series: per-bucket counts and a sum."""

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, family: Family, labelvalues: tuple[str, ...]) -> None:
        super().__init__(family, labelvalues)
        self._bounds: tuple[float, ...] = family._bounds
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        """Record one observation of ``amount``."""
        # The bisect call comes first: the two updates after it contain no
        # call, so under the GIL they happen together (see _FREE_THREADED).
        if amount != amount:
            # NaN fits no bucket and would make the sum NaN for good
            # (prometheus_client counts it nowhere and poisons the sum).
            raise ValueError(f"Histogram observation must be a number, got {amount!r}")
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

    def __init__(self, family: Family, labelvalues: tuple[str, ...]) -> None:
        super().__init__(family, labelvalues)
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0) -> None:
        # "not >=" also refuses NaN, which would leave the counter NaN for good.
        if not amount >= 0:
            raise ValueError(
                f"Counters can only be incremented by non-negative amounts, got {amount!r}"
            )
        with self._lock:
            self._value += amount


class _LockedGaugeChild(GaugeChild):
    __slots__ = ("_lock",)

    def __init__(self, family: Family, labelvalues: tuple[str, ...]) -> None:
        super().__init__(family, labelvalues)
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value -= amount


class _LockedHistogramChild(HistogramChild):
    __slots__ = ("_lock",)

    def __init__(self, family: Family, labelvalues: tuple[str, ...]) -> None:
        super().__init__(family, labelvalues)
        self._lock = threading.Lock()

    def observe(self, amount: float) -> None:
        if amount != amount:
            # NaN fits no bucket and would make the sum NaN for good
            # (prometheus_client counts it nowhere and poisons the sum).
            raise ValueError(f"Histogram observation must be a number, got {amount!r}")
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

ChildT = TypeVar("ChildT", bound=Series)
MetricT = TypeVar("MetricT", bound="MetricFamily[Any]")


class MetricFamily(Family, Generic[ChildT]):
    """A named metric with fixed label names, which hands out its series through ``labels()``."""

    metric_type: ClassVar[MetricType]
    _child_class: type[ChildT]

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str],
        registry: SeriesRegistry,
        bounds: tuple[float, ...] = (),
        builtin: bool = False,
    ) -> None:
        super().__init__(self.metric_type, name, documentation, labelnames, bounds, builtin)
        self._registry = registry
        # Keyed by the label values as the caller passed them, and also by
        # their str() form, so a repeat lookup is a single dict probe.
        self._children: dict[tuple[object, ...], ChildT] = {}
        self._overflow_child: ChildT | None = None
        # Creating a series happens once per label set, under this lock.
        self._lock = threading.Lock()
        # kwargs -> label values in definition order, as one C call.
        names = self._labelnames
        if len(names) == 1:
            only = names[0]
            self._values_of: Callable[[dict[str, object]], tuple[object, ...]] = lambda kw: (
                kw[only],
            )
        elif names:
            self._values_of = itemgetter(*names)
        else:
            self._values_of = lambda kw: ()

    @classmethod
    def _create(
        cls: type[MetricT],
        name: str,
        documentation: str,
        labelnames: Iterable[str],
        registry: SeriesRegistry,
        bounds: tuple[float, ...] = (),
        builtin: bool = False,
    ) -> MetricT:
        """A new metric of this type, which is its own one series when it has no labels."""
        # A str stays a str, for Family to refuse rather than split into letters.
        names = labelnames if isinstance(labelnames, str) else tuple(labelnames)
        if names:
            return cls(name, documentation, names, registry, bounds, builtin)
        unlabelled = cast("type[MetricT]", _UNLABELLED[cls])
        metric = unlabelled.__new__(unlabelled)
        MetricFamily.__init__(metric, name, documentation, names, registry, bounds, builtin)
        series = cast("Series", metric)
        cls._child_class.__init__(series, metric, ())
        return metric

    def labels(self, *labelvalues: object, **labelkwargs: object) -> ChildT:
        """The series for one set of label values, created on first use."""
        values = labelvalues
        if labelkwargs:
            if labelvalues or len(labelkwargs) != len(self._labelnames):
                self._raise_bad_labels(labelvalues, labelkwargs)
            try:
                values = self._values_of(labelkwargs)
            except KeyError:
                self._raise_bad_labels(labelvalues, labelkwargs)
        try:
            return self._children[values]
        except (KeyError, TypeError):
            return self._new_child(values)

    def _new_child(self, raw: tuple[object, ...]) -> ChildT:
        """Slow path of ``labels()``: validate, then find or create the series."""
        names = self._labelnames
        if not names:
            self._raise_bad_labels(raw, {})
        if len(raw) != len(names):
            raise ValueError(
                f"Incorrect label count for {self!r}: expected {len(names)}, got {len(raw)}"
            )
        values = tuple(validate_text(str(v), f"label value of {self!r}") for v in raw)
        with self._lock:
            child = self._children.get(values)
            if child is None:
                child = self._registry.add_series(self, lambda: self._child_class(self, values))
                if child is None:
                    return self._overflow()
                self._children[values] = child
            # Also remember the caller's own spelling (say an int), so the next
            # lookup with it is a single probe; unhashable values cannot be.
            with suppress(TypeError):
                self._children.setdefault(raw, child)
            return child

    def _overflow(self) -> ChildT:
        """A series that is never sent: what ``labels()`` gives past the series limit."""
        if self._overflow_child is None:
            self._overflow_child = self._child_class(self, ("",) * len(self._labelnames))
        return self._overflow_child

    def _missing_labels(self) -> ValueError:
        return ValueError(f"{self._kind} metric {self._name!r} is missing label values")

    def _raise_bad_labels(self, values: tuple[object, ...], kwargs: dict[str, object]) -> NoReturn:
        if not self._labelnames:
            raise ValueError(f"No label names were set when constructing {self!r}")
        if values:
            raise ValueError("Can't pass both *args and **kwargs")
        raise ValueError(
            f"Incorrect label names for {self!r}: expected {sorted(self._labelnames)}, "
            f"got {sorted(kwargs)}"
        )


class Counter(MetricFamily[CounterChild]):
    """A counter family; use :meth:`labels` to get a series, then ``inc()``."""

    metric_type = "counter"
    _child_class = _LockedCounterChild if _FREE_THREADED else CounterChild

    def inc(self, amount: float = 1.0) -> None:
        """Increment a counter that has no labels."""
        raise self._missing_labels()


class Gauge(MetricFamily[GaugeChild]):
    """A gauge family; use :meth:`labels` to get a series, then ``set()``."""

    metric_type = "gauge"
    _child_class = _LockedGaugeChild if _FREE_THREADED else GaugeChild

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


class Histogram(MetricFamily[HistogramChild]):
    """A histogram family; use :meth:`labels` to get a series, then ``observe()``."""

    metric_type = "histogram"
    _child_class = _LockedHistogramChild if _FREE_THREADED else HistogramChild

    @property
    def buckets(self) -> tuple[float, ...]:
        """Upper bounds, ending with +Inf."""
        return self._bounds

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


_UNLABELLED: dict[type[MetricFamily[Any]], type[MetricFamily[Any]]] = {
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
# The registry metrics are defined in.
# --------------------------------------------------------------------------


class MetricRegistry(SeriesRegistry):
    """A SeriesRegistry that defines counters, gauges and histograms.

    With ``builtins`` it also holds what every worker reports of itself: the
    step-duration histogram that ``step()`` feeds, and the built-in collectors.
    """

    def __init__(self, max_series: int | None = None, builtins: bool = False) -> None:
        super().__init__(max_series)
        # The step() histogram; None in a registry made without built-ins.
        self.step_duration: HistogramChild | None = None
        if builtins:
            step_duration = self._define(
                Histogram,
                "rankside_worker_step_duration_seconds",
                "Time between two consecutive step() calls of the worker.",
                (),
                STEP_DURATION_BUCKETS,
                builtin=True,
            )
            assert isinstance(step_duration, HistogramChild)
            self.step_duration = step_duration
            collectors.install(self)

    def counter(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> Counter:
        """Define (or get back) a counter. A ``_total`` suffix is implied."""
        if isinstance(name, str) and name.endswith("_total"):
            name = name[: -len("_total")]
        return self._define(Counter, name, documentation, labelnames)

    def gauge(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> Gauge:
        """Define (or get back) a gauge."""
        return self._define(Gauge, name, documentation, labelnames)

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        buckets: Sequence[float | str] = DEFAULT_BUCKETS,
    ) -> Histogram:
        """Define (or get back) a histogram with the given bucket upper bounds."""
        return self._define(Histogram, name, documentation, labelnames, _prepare_buckets(buckets))

    def _define(
        self,
        cls: type[MetricT],
        name: str,
        documentation: str,
        labelnames: Iterable[str],
        bounds: tuple[float, ...] = (),
        builtin: bool = False,
    ) -> MetricT:
        metric = self.register(cls._create(name, documentation, labelnames, self, bounds, builtin))
        if not isinstance(metric, cls):
            # Same shape, other class: a family a collector defined, which
            # no program can name (they are all under the reserved prefix).
            raise ValueError(f"Metric {name!r} is already defined by a collector")
        return metric


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
