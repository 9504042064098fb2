"""Workers' own metric series, as pushed in ``metrics`` frames.

Each worker's families and series are kept apart, under the worker's key,
with the labels ``rank``, ``local_rank`` and ``role`` the sidecar gives them.
Each series holds its sample lines, rendered when its value arrives, so a
scrape only joins strings; the joined text is cached until the next change.

A family that two workers define differently (another type, other label
names) is a conflict: the first definition wins, the other worker's family is
counted, logged and left out, so the exposition never carries a broken family.

Threads: ingestion and ``forget`` run on the event loop; ``render_workers``
may run on a worker thread. The store lock guards the structure and is held
only briefly by rendering; each worker's lock guards its values while one of
its families is being rendered.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from operator import attrgetter
from typing import Any, cast

from prometheus_client import utils as _prom_utils

from sidecar.metrics import own
from sidecar.metrics.payload import (
    MetricsPayloadError,
    decode,
    family_definition,
    histogram_value,
    is_int,
    is_number,
    series_definition,
)
from worker_hooks.protocol import sample_names

log = logging.getLogger("rankside.sidecar")

WORKER_LABELS = ("rank", "local_rank", "role")


# +Inf, -Inf, NaN and bucket bounds spelled the way Go (and Prometheus) does.
go_float = cast(Callable[[float], str], _prom_utils.floatToGoString)


def escape_label_value(value: str) -> str:
    """Escape a label value for the text and OpenMetrics formats alike."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str, openmetrics: bool) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if openmetrics else text


def format_value(value: float) -> str:
    """A sample value as both formats spell it (``+Inf``, ``NaN``)."""
    if value - value == 0:  # finite; inf - inf and nan - nan are nan
        return repr(value)
    return go_float(value)


def family_header(name: str, kind: str, documentation: str, openmetrics: bool) -> str:
    """HELP and TYPE lines; the text format names a counter by its ``_total`` sample."""
    exposed = name + "_total" if kind == "counter" and not openmetrics else name
    return f"# HELP {exposed} {escape_help(documentation, openmetrics)}\n# TYPE {exposed} {kind}\n"


def worker_label_text(labels: Mapping[str, str]) -> str:
    """``rank="0",local_rank="0",role="trainer"``: the sidecar's labels of one worker."""
    return ",".join(f'{n}="{escape_label_value(labels.get(n, ""))}"' for n in WORKER_LABELS)


class _Family:
    """One worker's definition of a family, its series and its rendered lines."""

    __slots__ = (
        "bounds",
        "documentation",
        "exposed",
        "fid",
        "kind",
        "label_sets",
        "labelnames",
        "le_text",
        "name",
        "series",
        "shape",
    )

    def __init__(
        self,
        fid: int,
        name: str,
        kind: str,
        documentation: str,
        labelnames: tuple[str, ...],
        bounds: tuple[float, ...],
    ) -> None:
        self.fid = fid
        self.name = name
        self.kind = kind
        self.documentation = documentation
        self.labelnames = labelnames
        self.bounds = bounds
        # Label order does not matter to Prometheus; the names do.
        self.shape = (kind, frozenset(labelnames))
        self.series: list[_Series] = []
        self.label_sets: set[tuple[str, ...]] = set()
        self.le_text = [f',le="{go_float(b)}"}} ' for b in bounds]
        self.exposed = False

    def render(self) -> bytes:
        """This worker's sample lines of the family; both formats share them."""
        return b"".join(map(_TEXT, self.series))

    def prefix(self, labels: str) -> str:
        """``name_total{labels} `` for a counter or gauge series."""
        return f"{self.name}{'_total' if self.kind == 'counter' else ''}{{{labels}}} "

    def template(self, labels: str) -> str:
        """All lines of one histogram series, with %d for counts and %s for the sum."""
        name, labels = self.name, labels.replace("%", "%%")
        lines = [f"{name}_bucket{{{labels}{le}%d\n" for le in self.le_text]
        lines.append(f"{name}_count{{{labels}}} %d\n")
        # OpenMetrics forbids _sum when buckets go negative; prometheus_client agrees.
        if self.bounds[0] >= 0:
            lines.append(f"{name}_sum{{{labels}}} %s\n")
        return "".join(lines)


class _Series:
    """One series and its sample lines, rendered when its value arrives.

    Formatting a float is the costliest step of rendering (CPython's shortest
    repr, up to 0.8 us), so it happens once per pushed value on ingestion and
    a scrape only joins strings: the lines of 64 workers with 1,000 series
    each (100k lines) join in a few milliseconds.
    """

    __slots__ = ("family", "prefix", "template", "text", "value")

    def __init__(self, family: _Family, labels: str) -> None:
        self.family = family
        # labels is the whole label set: worker labels, then the series' own.
        if family.kind == "histogram":
            self.template = family.template(labels)
            self.prefix = ""
        else:
            self.prefix = family.prefix(labels)
            self.template = ""
        self.value: Any = None
        self.text = b""

    def set(self, value: Any) -> None:
        self.value = value
        if self.template:
            # Cumulative counts, the +Inf count again for _count, then the sum.
            if self.family.bounds[0] >= 0:
                text = self.template % (*value[:-1], value[-2], format_value(value[-1]))
            else:
                text = self.template % (*value[:-1], value[-2])
        else:
            text = f"{self.prefix}{format_value(value)}\n"
        # Bytes, so that a scrape joins them straight into the response body.
        self.text = text.encode()


_TEXT = attrgetter("text")


class _Worker:
    __slots__ = ("by_name", "dropped", "families", "key", "label_text", "lock", "series")

    def __init__(self, key: str, label_text: str) -> None:
        self.key = key
        self.label_text = label_text
        self.families: dict[int, _Family] = {}
        self.by_name: dict[str, _Family] = {}
        self.series: dict[int, _Series] = {}
        self.dropped = 0
        self.lock = threading.Lock()


class MetricStore:
    """Every worker's pushed families and series, ready to render."""

    def __init__(self, reserved_names: Iterable[str] = ()) -> None:
        # Sample names the sidecar renders itself; a worker family that would
        # produce one of them is a conflict.
        self._reserved = frozenset(reserved_names)
        self._lock = threading.Lock()
        self._workers: dict[str, _Worker] = {}
        self._hidden: set[tuple[str, str]] = set()
        # Exposed family names in order, with their headers and families.
        self._plan: list[tuple[str, tuple[bytes, bytes], list[_Family]]] = []
        self._version = 0
        self._cache: dict[bool, tuple[int, bytes]] = {}
        self.conflicts = 0

    # -- ingestion ------------------------------------------------------------

    def ingest(self, worker_key: str, labels: Mapping[str, str], body: bytes) -> None:
        """Apply one ``metrics`` frame body from worker ``worker_key``.

        ``labels`` holds the worker's ``rank``, ``local_rank`` and ``role``.
        Raises MetricsPayloadError, changing nothing, if the body is malformed.
        """
        payload = decode(body)
        full = payload["full"]
        label_text = worker_label_text(labels)
        with self._lock:
            current = self._workers.get(worker_key)
            if full or current is None or current.label_text != label_text:
                if not full:
                    raise MetricsPayloadError(
                        "the first metrics payload of a worker must be a full one"
                    )
                worker = _Worker(worker_key, label_text)
            else:
                worker = current
            try:
                families = self._parse_families(worker, payload["families"])
                series = self._parse_series(worker, families, payload["series"])
                values = _parse_values(worker, series, payload["values"])
            except (OverflowError, TypeError) as exc:
                # An integer too large for a float, say: bad input, not a crash.
                raise MetricsPayloadError(f"metrics payload value out of range: {exc}") from None
            dropped = payload["dropped"]
            with worker.lock:
                for family in families.values():
                    worker.families[family.fid] = family
                    worker.by_name[family.name] = family
                for sid, one in series.items():
                    worker.series[sid] = one
                    one.family.series.append(one)
                for one, value in values:
                    one.set(value)
                worker.dropped = dropped
            self._version += 1
            if worker is not current:
                # Assigning to an existing key keeps the worker's place, so a
                # reconnect does not change which definition wins a conflict.
                self._workers[worker_key] = worker
            if worker is not current or families:
                self._rebuild()

    def _parse_families(self, worker: _Worker, raw: list[Any]) -> dict[int, _Family]:
        families: dict[int, _Family] = {}
        names = set(worker.by_name)
        for item in raw:
            fid, name, kind, documentation, labelnames, bounds = family_definition(item)
            if fid in worker.families or fid in families:
                raise MetricsPayloadError(f"family id {fid!r} is already defined")
            if name in names:
                raise MetricsPayloadError(f"family name {name!r} is already defined")
            families[fid] = _Family(fid, name, kind, documentation, labelnames, bounds)
            names.add(name)
        return families

    def _parse_series(
        self, worker: _Worker, families: dict[int, _Family], raw: list[Any]
    ) -> dict[int, _Series]:
        series: dict[int, _Series] = {}
        pending_sets: set[tuple[int, tuple[str, ...]]] = set()
        for item in raw:
            sid, fid, values = series_definition(item)
            if sid in worker.series or sid in series:
                raise MetricsPayloadError(f"series id {sid!r} is already defined")
            family = families.get(fid) or worker.families.get(fid)
            if family is None:
                raise MetricsPayloadError(f"series {sid} refers to unknown family {fid!r}")
            if len(values) != len(family.labelnames):
                raise MetricsPayloadError(
                    f"series {sid} of {family.name!r} needs {len(family.labelnames)} "
                    f"string label values, got {list(values)!r}"
                )
            label_set = values
            if label_set in family.label_sets or (family.fid, label_set) in pending_sets:
                raise MetricsPayloadError(
                    f"series {sid} repeats the label values {values!r} of {family.name!r}"
                )
            pending_sets.add((family.fid, label_set))
            own = "".join(
                f',{n}="{escape_label_value(v)}"'
                for n, v in zip(family.labelnames, values, strict=True)
            )
            series[sid] = _Series(family, worker.label_text + own)
        for fid, label_set in pending_sets:
            owner = families.get(fid) or worker.families[fid]
            owner.label_sets.add(label_set)
        return series

    # -- conflicts ----------------------------------------------------------------

    def _rebuild(self) -> None:
        """Decide which definitions are exposed; called under the store lock.

        The first worker (in order of arrival) to define a name fixes its
        type and label names; another worker's family of that name with a
        different shape, or one whose series would collide with another
        family's, is hidden. Linear in the number of families, and only run
        when definitions change.
        """
        owner_of_sample = {name: "" for name in self._reserved}
        canonical: dict[str, _Family] = {}
        exposed: dict[str, list[_Family]] = {}
        hidden: set[tuple[str, str]] = set()
        for worker in self._workers.values():
            for family in worker.families.values():
                first = canonical.get(family.name)
                if first is None:
                    clash = [
                        s
                        for s in sample_names(family.name, family.kind)
                        if owner_of_sample.get(s, family.name) != family.name
                    ]
                    if clash:
                        hidden.add((worker.key, family.name))
                        family.exposed = False
                        continue
                    canonical[family.name] = family
                    exposed[family.name] = []
                    for s in sample_names(family.name, family.kind):
                        owner_of_sample[s] = family.name
                    first = family
                ok = family.shape == first.shape
                family.exposed = ok
                if ok:
                    exposed[family.name].append(family)
                else:
                    hidden.add((worker.key, family.name))
        for worker_key, name in sorted(hidden - self._hidden):
            self.conflicts += 1
            own.METRIC_CONFLICTS.inc()
            first = canonical.get(name)
            log.warning(
                "metric family %r of worker %s conflicts with %s and is not exposed",
                name,
                worker_key,
                f"the {first.kind} with labels {sorted(first.labelnames)} defined first"
                if first is not None
                else "the series of another family",
            )
        self._hidden = hidden
        self._plan = [
            (
                name,
                (
                    family_header(
                        name, canonical[name].kind, canonical[name].documentation, False
                    ).encode(),
                    family_header(
                        name, canonical[name].kind, canonical[name].documentation, True
                    ).encode(),
                ),
                exposed[name],
            )
            for name in sorted(canonical)
        ]

    # -- lifecycle ----------------------------------------------------------------

    def forget(self, worker_key: str) -> None:
        """Drop every series of a worker (its grace period is over)."""
        with self._lock:
            if self._workers.pop(worker_key, None) is not None:
                self._version += 1
                self._rebuild()

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._workers)

    def value(self, worker_key: str, name: str) -> float | None:
        """The last pushed value of a worker's unlabelled counter or gauge ``name``."""
        worker = self._workers.get(worker_key)
        family = worker.by_name.get(name) if worker is not None else None
        if worker is None or family is None or family.kind == "histogram" or family.labelnames:
            return None
        with worker.lock:
            values = [s.value for s in family.series if s.value is not None]
        return float(values[0]) if values else None

    def dropped_series(self, worker_key: str) -> int:
        """Label sets the worker refused past its series limit, as it reported."""
        worker = self._workers.get(worker_key)
        return worker.dropped if worker is not None else 0

    def series_count(self) -> int:
        with self._lock:
            return sum(len(w.series) for w in self._workers.values())

    @property
    def hidden(self) -> set[tuple[str, str]]:
        """(worker key, family name) of every definition left out as a conflict."""
        return set(self._hidden)

    # -- rendering ----------------------------------------------------------------

    def render_workers(self, openmetrics: bool) -> bytes:
        """Every exposed family, HELP and TYPE once, each worker's lines after them.

        UTF-8 bytes, cached until the next change: one copy of the text is
        kept per format, besides the lines each series holds.
        """
        with self._lock:
            version = self._version
            cached = self._cache.get(openmetrics)
            if cached is not None and cached[0] == version:
                return cached[1]
            plan = self._plan
            workers = list(self._workers.values())
        chunks: dict[int, bytes] = {}
        for worker in workers:
            # Held while one worker's families are joined: ingestion into this
            # worker waits at most that long, the others not at all.
            with worker.lock:
                for family in worker.families.values():
                    if family.exposed:
                        chunks[id(family)] = family.render()
        out: list[bytes] = []
        for _name, headers, families in plan:
            out.append(headers[openmetrics])
            out.extend(chunks.get(id(f), b"") for f in families)
        body = b"".join(out)
        with self._lock:
            self._cache[openmetrics] = (version, body)
        return body


def _parse_values(
    worker: _Worker, new_series: dict[int, _Series], raw: list[Any]
) -> list[tuple[_Series, Any]]:
    if len(raw) % 2:
        raise MetricsPayloadError("metrics payload 'values' must hold id, value pairs")
    known = worker.series
    updates: list[tuple[_Series, Any]] = []
    for i in range(0, len(raw), 2):
        sid, value = raw[i], raw[i + 1]
        series = known.get(sid) if is_int(sid) else None
        if series is None:
            series = new_series.get(sid) if is_int(sid) else None
            if series is None:
                raise MetricsPayloadError(f"value for unknown series {sid!r}")
        family = series.family
        if family.kind == "histogram":
            value = histogram_value(family.name, len(family.bounds), value)
        elif is_number(value):
            value = float(value)
        else:
            raise MetricsPayloadError(f"value of series {sid} must be a number, got {value!r}")
        updates.append((series, value))
    return updates
