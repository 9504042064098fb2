"""The collection side of a worker's metrics: every family and series with its id on the wire,
the series limit, the hooks that sample values when a collection starts, and the encoding of
what was collected as the body of a ``metrics`` frame (``protocol.MetricsPayload``). It knows
families and series only through the two base classes here, which the metric objects
(``metrics``) and the built-in collectors (``collectors``) extend, so it imports neither.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import TypeVar

from .protocol import (
    PAYLOAD_VERSION,
    RESERVED_LABELNAMES,
    FamilyDefinition,
    MetricsPayload,
    MetricType,
    SampleValue,
    SeriesDefinition,
    sample_names,
    validate_labelnames,
    validate_metric_name,
    validate_text,
)

DEFAULT_MAX_SERIES = 10_000


def max_series_from_env() -> int:
    """``RANKSIDE_MAX_SERIES``, or DEFAULT_MAX_SERIES (with a warning) when it is no count."""
    # A bad value must not stop a training job from importing its metrics.
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


class Family:
    """A family as the registry keeps it: a definition, valid once constructed, and its id."""

    # No __slots__: a metric without labels is a Family and its own one Series,
    # and a class cannot have two bases that both lay out slots.

    def __init__(
        self,
        kind: MetricType,
        name: str,
        documentation: str,
        labelnames: Iterable[str],
        bounds: tuple[float, ...] = (),
        builtin: bool = False,
    ) -> None:
        self._kind: MetricType = kind
        self._name = validate_metric_name(name, builtin)
        if not isinstance(documentation, str):
            raise TypeError(f"documentation of {name!r} must be a string")
        self._documentation = validate_text(documentation, f"documentation of {name!r}")
        self._labelnames = validate_labelnames(labelnames, RESERVED_LABELNAMES[kind])
        self._bounds = bounds
        self._builtin = builtin
        self._fid = -1

    @property
    def name(self) -> str:
        """The family's name as exposed (without ``_total`` for counters)."""
        return self._name

    @property
    def labelnames(self) -> tuple[str, ...]:
        return self._labelnames

    def _shape(self) -> tuple[str, tuple[str, ...], tuple[float, ...]]:
        return (self._kind, self._labelnames, self._bounds)

    def _describe_shape(self) -> str:
        text = f"{self._kind} with labels {list(self._labelnames)!r}"
        return text + (f" and buckets {list(self._bounds)!r}" if self._bounds else "")

    def _definition(self) -> FamilyDefinition:
        bounds = list(self._bounds) if self._bounds else None
        return (
            self._fid,
            self._name,
            self._kind,
            self._documentation,
            list(self._labelnames),
            bounds,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r})"


class Series:
    """A series as the registry keeps it besides its value: family, label values, id, last sent."""

    __slots__ = ("_family", "_labelvalues", "_sent", "_sid")

    def __init__(self, family: Family, labelvalues: tuple[str, ...]) -> None:
        self._family = family
        self._labelvalues = labelvalues
        self._sid = -1
        self._sent: SampleValue | None = None

    def _read(self) -> SampleValue:
        """The value as sent on the wire; called on the collecting thread."""
        raise NotImplementedError


S = TypeVar("S", bound=Series)


class SeriesRegistry:
    """All families and series of one worker process, and their encoding for the sidecar."""

    def __init__(self, max_series: int | None = None) -> None:
        self.max_series = max_series_from_env() if max_series is None else max_series
        self._lock = threading.Lock()
        self._families: list[Family] = []
        self._by_name: dict[str, Family] = {}
        self._sample_names: dict[str, str] = {}
        # Append-only, in creation order; a series' id is its index here.
        self._series: list[Series] = []
        # What max_series limits: the program's own series. The built-ins
        # (process, step, devices) once took their share of a small limit.
        self._own_series = 0
        self._dropped = 0
        self._warned = False
        # collect_payload runs on one thread at a time; this also guards
        # the bookkeeping of what was already sent.
        self._collect_lock = threading.Lock()
        self._sent_families = 0
        self._sent_series = 0
        self._sent_dropped = 0
        self._hooks: list[Callable[[], None]] = []
        # What a split left out because it alone is over the sidecar's frame
        # limit (fids, sids): never sent, so never referred to until a full payload.
        self._left_out_families: set[int] = set()
        self._left_out_series: set[int] = set()
        self._warned_split = False
        self._warned_left_out = False

    # -- definitions --------------------------------------------------------

    def register(self, family: Family) -> Family:
        """Add ``family``, or give back the family of its name if that has the same shape.

        The same definition twice (say, in a module imported by two code paths)
        so yields one family. Another shape under a taken name, or samples that
        another family already produces, are a ValueError. A family that is a
        Series too (a metric without labels) becomes its own one series, which
        the series limit does not refuse (it counts, if not built-in): there is
        one per definition.
        """
        name = family._name
        with self._lock:
            existing = self._by_name.get(name)
            if existing is not None:
                if existing._shape() == family._shape():
                    return existing
                raise ValueError(
                    f"Metric {name!r} is already defined as {existing._describe_shape()}; "
                    f"it cannot be defined again as {family._describe_shape()}"
                )
            samples = sample_names(name, family._kind)
            clashes = sorted(s for s in samples if s in self._sample_names)
            if clashes:
                owners = sorted({self._sample_names[s] for s in clashes})
                raise ValueError(
                    f"Metric {name!r} would produce series {clashes!r}, which metric(s) "
                    f"{owners!r} already produce"
                )
            family._fid = len(self._families)
            self._families.append(family)
            self._by_name[name] = family
            for sample in samples:
                self._sample_names[sample] = name
            if isinstance(family, Series):
                self._append(family)
            return family

    def get(self, name: str) -> Family | None:
        """The family defined under ``name`` (counters without ``_total``), if any."""
        return self._by_name.get(name)

    # -- series ---------------------------------------------------------------

    def add_series(self, family: Family, make: Callable[[], S]) -> S | None:
        """The new series of ``family`` that ``make`` builds, with its id; None past the limit.

        A refusal is counted in ``dropped_series``; the first one warns.
        """
        with self._lock:
            if family._builtin or self._own_series < self.max_series:
                series = make()
                self._append(series)
                return series
            self._dropped += 1
            first_refusal = not self._warned
            self._warned = True
        if first_refusal:
            warnings.warn(
                f"rankside: this worker reached its limit of {self.max_series} metric series "
                f"(RANKSIDE_MAX_SERIES); new label sets of {family.name!r} and other metrics are "
                "dropped and counted in rankside_worker_dropped_series_total",
                RuntimeWarning,
                # Past add_series, MetricFamily._new_child and labels(): the
                # line of the program that asked for the label set.
                stacklevel=4,
            )
        return None

    def _append(self, series: Series) -> None:
        series._sid = len(self._series)
        self._series.append(series)
        if not series._family._builtin:
            self._own_series += 1

    @property
    def dropped_series(self) -> int:
        """How many new label sets were refused because of the series limit."""
        return self._dropped

    @property
    def series_count(self) -> int:
        return len(self._series)

    # -- collection -----------------------------------------------------------

    def add_collect_hook(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` at the start of every collection, on the collecting thread.

        This is how values that are sampled rather than counted (CPU time,
        memory) stay off the hot path.
        """
        self._hooks.append(hook)

    def collect_payload(self, full: bool) -> bytes | None:
        """A ``metrics`` frame body (``protocol.MetricsPayload``), or None when nothing changed.

        ``full`` sends every definition and value, as the sidecar needs after a
        (re)connect; otherwise only new definitions and changed values are sent.
        """
        payload = self._collect(full)
        return None if payload is None else _dumps(payload)

    def collect_payloads(self, full: bool, limit: int) -> list[bytes]:
        """The ``metrics`` frame bodies of one collection, each at most ``limit`` bytes.

        Usually one, or none when nothing changed. A collection over ``limit``
        (the sidecar's frame limit, less the frame's header) is split into
        payloads that the sidecar applies in order, the first carrying
        ``full``; a definition or value that alone exceeds it is left out (a
        family with its series), for as long as the sidecar keeps the limit. Each
        warns the first time. Only the connection thread calls this.
        """
        payload = self._collect(full)
        if payload is None:
            return []
        if full:
            self._left_out_families.clear()
            self._left_out_series.clear()
        elif self._left_out_families or self._left_out_series:
            payload = self._without_left_out(payload)
        body = _dumps(payload)
        if len(body) <= limit:
            return [body]
        bodies = self._split(payload, limit)
        if not self._warned_split:
            self._warned_split = True
            warnings.warn(
                f"rankside: a metrics payload of {len(body)} bytes exceeds the sidecar's frame "
                f"limit of {limit} bytes (--max-frame); sending it in {len(bodies)} frames",
                RuntimeWarning,
                stacklevel=2,
            )
        return bodies

    def _collect(self, full: bool) -> MetricsPayload | None:
        with self._collect_lock:
            for hook in self._hooks:
                try:
                    hook()
                except Exception as exc:  # a broken probe must not stop the flushes
                    warnings.warn(
                        f"rankside: metrics collect hook failed: {exc!r}",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            with self._lock:
                families = self._families[:]
                series = self._series[:]
            first_family = 0 if full else self._sent_families
            first_series = 0 if full else self._sent_series
            new_families = [f._definition() for f in families[first_family:]]
            new_series: list[SeriesDefinition] = [
                (s._sid, s._family._fid, list(s._labelvalues)) for s in series[first_series:]
            ]
            values: list[int | SampleValue] = []
            for one in series:
                value = one._read()
                if full or value != one._sent:
                    one._sent = value
                    values.append(one._sid)
                    values.append(value)
            dropped = self._dropped
            changed = new_families or new_series or values or dropped != self._sent_dropped
            self._sent_families = len(families)
            self._sent_series = len(series)
            self._sent_dropped = dropped
            if not full and not changed:
                return None
            return {
                "v": PAYLOAD_VERSION,
                "full": full,
                "families": new_families,
                "series": new_series,
                "values": values,
                "dropped": dropped,
            }

    def _without_left_out(self, payload: MetricsPayload) -> MetricsPayload:
        """``payload`` without what an earlier split left out, which the sidecar never got."""
        families, series = self._left_out_families, self._left_out_series
        values = payload["values"]
        kept: list[int | SampleValue] = []
        for i in range(0, len(values), 2):
            if values[i] not in series:
                kept += values[i : i + 2]
        return {
            **payload,
            "families": [f for f in payload["families"] if f[0] not in families],
            "series": [s for s in payload["series"] if s[0] not in series and s[1] not in families],
            "values": kept,
        }

    def _split(self, payload: MetricsPayload, limit: int) -> list[bytes]:
        """``payload`` as bodies of at most ``limit`` bytes, in the order the sidecar needs.

        Families come before the series that name them, and series before their
        values, so each body refers only to itself and the bodies before it.
        """
        empty: MetricsPayload = {
            **payload,
            "full": False,
            "families": [],
            "series": [],
            "values": [],
        }
        # Every item is counted with a comma after it: an upper bound of its share.
        room = limit - len(_dumps(empty))

        def fresh(full: bool) -> MetricsPayload:
            return {**empty, "full": full, "families": [], "series": [], "values": []}

        chunks = [fresh(payload["full"])]
        used = 0
        left_out: list[str] = []

        def place(field: str, items: list[object], size: int) -> None:
            nonlocal used
            if used + size > room:
                chunks.append(fresh(False))
                used = 0
            target: list[object] = chunks[-1][field]  # type: ignore[literal-required]
            target += items
            used += size

        for family in payload["families"]:
            size = len(_dumps(family)) + 1
            if size > room:
                self._left_out_families.add(family[0])
                left_out.append(f"metric {family[1]!r}")
            else:
                place("families", [family], size)
        for one in payload["series"]:
            size = len(_dumps(one)) + 1
            if one[1] in self._left_out_families:
                self._left_out_series.add(one[0])
            elif size > room:
                self._left_out_series.add(one[0])
                left_out.append(f"a series with labels {one[2]!r:.200}")
            else:
                place("series", [one], size)
        values = payload["values"]
        for i in range(0, len(values), 2):
            sid, value = values[i], values[i + 1]
            if sid in self._left_out_series:
                continue
            size = len(_dumps(sid)) + len(_dumps(value)) + 2
            if size > room:
                left_out.append(f"the value of series {sid}")
            else:
                place("values", [sid, value], size)
        if left_out and not self._warned_left_out:
            self._warned_left_out = True
            warnings.warn(
                f"rankside: left out {', '.join(left_out[:3])}"
                f"{' and others' if len(left_out) > 3 else ''}: too big for one frame of the "
                f"sidecar's limit of {limit} bytes (--max-frame)",
                RuntimeWarning,
                stacklevel=3,
            )
        return [_dumps(chunk) for chunk in chunks]


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
