"""Rendering the exposition that ``GET /metrics`` serves: workers' series, built-ins, own.

Content negotiation is prometheus_client's (``choose_encoder``,
``gzip_accepted``): OpenMetrics 1.0 when the Accept header asks for it, the
text format 0.0.4 otherwise, gzip when Accept-Encoding allows.

The work is split so that the event loop stays free: the built-in series,
which read the worker table that only the loop may touch, render on the
loop (a handful of lines per worker); the workers' own series, the sidecar's
self-metrics and compression run on a worker thread.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import anyio.to_thread
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.openmetrics.exposition import (
    generate_latest as openmetrics_generate_latest,
)

from sidecar.metrics import own
from sidecar.metrics.store import (
    MetricStore,
    escape_label_value,
    family_header,
    format_value,
    worker_label_text,
)
from sidecar.schema import WorkerState
from worker_hooks.protocol import sample_names


class ExposedWorker(Protocol):
    """What the built-in series need of a worker (``sidecar.node.workers.Worker``)."""

    key: str
    rank: int | None
    local_rank: int | None
    role: str
    pid: int
    run_id: str
    hostname: str
    restart_count: int
    state: WorkerState
    step: int | None
    progress_time: float | None
    stalled_since: float | None
    collective_lag: float | None


CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
# Level 1 compresses metrics text about 24 times (9.4 MB to 390 kB for 64
# workers' 1,000 series each) and several times faster than gzip's default 9.
GZIP_LEVEL = 1

# The per-worker series the sidecar renders from its registry: name, type, help.
BUILTIN_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("rankside_worker_up", "gauge", "1 while the worker is connected, 0 once it ended."),
    (
        "rankside_worker_info",
        "gauge",
        "Identity of the worker process, as labels; the value is always 1.",
    ),
    (
        "rankside_worker_restarts",
        "counter",
        "torchelastic restarts before this worker started (TORCHELASTIC_RESTART_COUNT).",
    ),
    ("rankside_worker_step", "gauge", "Last training step the worker reported."),
    (
        "rankside_worker_last_progress_timestamp_seconds",
        "gauge",
        "Unix time of the worker's last step() call.",
    ),
    (
        "rankside_worker_dropped_series",
        "counter",
        "Label sets the worker refused past its series limit (RANKSIDE_MAX_SERIES).",
    ),
    (
        "rankside_worker_stalled",
        "gauge",
        "1 while the worker is stalled: no progress or no heartbeat past its threshold.",
    ),
    (
        "rankside_worker_collective_lag_seconds",
        "gauge",
        "Median time the rank enqueues its collectives after its group's median rank.",
    ),
)


def reserved_sample_names(registry: CollectorRegistry = own.REGISTRY) -> set[str]:
    """Sample names the sidecar itself renders, which no worker family may produce."""
    names = {s for name, kind, _ in BUILTIN_FAMILIES for s in sample_names(name, kind)}
    for family in registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def worker_labels(worker: ExposedWorker) -> dict[str, str]:
    """The sidecar's labels for a worker's series.

    A worker without a rank (not started by torchrun) is labelled with its
    key, ``pid-<pid>``, so that two of them never produce the same series.
    """
    return {
        "rank": str(worker.rank) if worker.rank is not None else worker.key,
        "local_rank": str(worker.local_rank) if worker.local_rank is not None else "",
        "role": worker.role,
    }


def render_builtins(workers: Sequence[ExposedWorker], store: MetricStore, openmetrics: bool) -> str:
    """The per-worker built-in families; cheap, rendered on every scrape."""
    labels = [worker_label_text(worker_labels(w)) for w in workers]
    values: dict[str, Callable[[ExposedWorker, str], str | None]] = {
        "rankside_worker_up": lambda w, lab: (
            f"{{{lab}}} {1 if w.state is WorkerState.RUNNING else 0}"
        ),
        "rankside_worker_info": lambda w, lab: (
            f'{{{lab},pid="{w.pid}",run_id="{escape_label_value(w.run_id)}",'
            f'hostname="{escape_label_value(w.hostname)}"}} 1'
        ),
        "rankside_worker_restarts": lambda w, lab: f"_total{{{lab}}} {w.restart_count}",
        "rankside_worker_step": lambda w, lab: None if w.step is None else f"{{{lab}}} {w.step}",
        "rankside_worker_last_progress_timestamp_seconds": lambda w, lab: (
            None if w.progress_time is None else f"{{{lab}}} {format_value(w.progress_time)}"
        ),
        "rankside_worker_dropped_series": lambda w, lab: (
            f"_total{{{lab}}} {store.dropped_series(w.key)}"
        ),
        "rankside_worker_stalled": lambda w, lab: (
            f"{{{lab}}} {0 if w.stalled_since is None else 1}"
        ),
        "rankside_worker_collective_lag_seconds": lambda w, lab: (
            None if w.collective_lag is None else f"{{{lab}}} {format_value(w.collective_lag)}"
        ),
    }
    out: list[str] = []
    for name, kind, documentation in BUILTIN_FAMILIES:
        out.append(family_header(name, kind, documentation, openmetrics))
        line = values[name]
        for worker, lab in zip(workers, labels, strict=True):
            rest = line(worker, lab)
            if rest is not None:
                out.append(f"{name}{rest}\n")
    return "".join(out)


def render_self(openmetrics_format: bool, registry: CollectorRegistry) -> str:
    """The sidecar's own metrics, as prometheus_client renders them."""
    if openmetrics_format:
        render = cast(Callable[[CollectorRegistry], bytes], openmetrics_generate_latest)
        return render(registry).decode().removesuffix("# EOF\n")
    return generate_latest(registry).decode()


def negotiate(accept: str) -> tuple[bool, str]:
    """(OpenMetrics?, content type) for an Accept header, as prometheus_client decides."""
    _, content_type = choose_encoder(accept)
    if content_type.startswith("application/openmetrics-text"):
        # We write OpenMetrics 1.0.0 whatever later version was asked for.
        return True, CONTENT_TYPE_OPENMETRICS
    if content_type.startswith("text/plain; version=1.0.0"):
        # The 1.0.0 text format only differs in quoting non-classic names,
        # which rankside never has; say what was negotiated.
        return False, content_type
    return False, CONTENT_TYPE_TEXT


@dataclass(frozen=True)
class Scrape:
    """A rendered /metrics response, in parts that are sent one after another.

    The workers' part is the store's cached bytes as they are: joining it with
    the rest would copy some 9 MB per scrape of 64 workers' 1,000 series each.
    """

    parts: tuple[bytes, ...]
    content_type: str
    gzipped: bool

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)


class Exposition:
    """Renders /metrics from the workers, the metric store and the sidecar's own metrics.

    ``workers`` lists the workers to expose; it is called on the event loop.
    """

    def __init__(
        self,
        store: MetricStore,
        workers: Callable[[], Sequence[ExposedWorker]],
        own_registry: CollectorRegistry = own.REGISTRY,
    ) -> None:
        self.store = store
        self.workers = workers
        self.own_registry = own_registry

    async def scrape(self, accept: str, accept_encoding: str) -> Scrape:
        """Render on the loop what needs the registry, the rest on a worker thread."""
        start = time.perf_counter()
        openmetrics_format, content_type = negotiate(accept)
        compress = gzip_accepted(accept_encoding)
        builtins = self.prepare(openmetrics_format)
        parts = await anyio.to_thread.run_sync(self.finish, builtins, openmetrics_format, compress)
        own.SCRAPE_DURATION.observe(time.perf_counter() - start)
        return Scrape(parts, content_type, compress)

    def prepare(self, openmetrics_format: bool) -> str:
        """The event-loop part: worker reads, built-ins and gauges."""
        workers = self.workers()
        own.WORKERS_CONNECTED.set(sum(1 for w in workers if w.state is WorkerState.RUNNING))
        own.WORKERS_KNOWN.set(len(workers))
        own.METRIC_SERIES.set(self.store.series_count())
        return render_builtins(workers, self.store, openmetrics_format)

    def finish(self, builtins: str, openmetrics_format: bool, compress: bool) -> tuple[bytes, ...]:
        """The thread part: workers' series, self-metrics, encoding and gzip."""
        rest = builtins + render_self(openmetrics_format, self.own_registry)
        if openmetrics_format:
            rest += "# EOF\n"
        parts = (self.store.render_workers(openmetrics_format), rest.encode())
        if not compress:
            return parts
        # One gzip stream over the parts, without joining them first.
        gzipper = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return (*(gzipper.compress(part) for part in parts), gzipper.flush())
