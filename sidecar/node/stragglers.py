"""Stragglers: the ranks that arrive late at every collective.

In synchronous data parallelism every rank has the same step time (the fast
ranks wait for the slow one in each collective), so step time cannot point at
a slow rank. Arrival can: for each collective sequence number of a group, each
rank's enqueue time (the flight recorder's ``time_created_ns``, sent by the
workers every ``RANKSIDE_LAG_INTERVAL`` seconds) against the group's median
enqueue time for it. A rank whose median lag over the newest collectives is
large in absolute terms (``MIN_LAG_SECONDS``) and against the step time
(``STEP_FRACTION``) is a straggler.

Enqueue times of one node come from one clock. Across nodes they are compared
by wall clock, so the lag is only as true as the nodes' clock agreement
(NTP or chrony keep it within a millisecond or so, well under the 20 ms floor
below); docs/diagnosis.md says more.

``lags`` is pure, over ``RankArrivals``, so one node's ranks or a whole job's
(the arrivals of the other nodes, as their ``GET /api/v1/stragglers?arrivals=true``
answers) are weighed the same way. ``StragglerWatch`` runs it every
``CHECK_SECONDS``, sets each of this node's workers' lag (exposed as
``rankside_worker_collective_lag_seconds``), and keeps a ``straggler``
incident open while one of this node's ranks is a straggler: only the node
that runs a straggler names it, so it is named once in a job.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from sidecar.node.diagnosis import Culprit, Evidence, Verdict, is_int, rank_list
from sidecar.node.events import EventKind, EventLog
from sidecar.node.incidents import Incident, IncidentKind, Incidents, Scope, new_incident_id
from sidecar.node.jobwide import JobScope
from sidecar.node.workers import Worker, WorkerTable
from sidecar.schema import WorkerState

# The newest collectives of each group that all its reporting ranks arrived at.
WINDOW = 64
# Fewer than this many lags, and a rank's median says nothing yet.
MIN_SAMPLES = 8
# A straggler's median lag is at least this, and this fraction of the median step.
MIN_LAG_SECONDS = 0.02
STEP_FRACTION = 0.2
# How often the watch weighs the arrivals (the workers send them every 30 s).
CHECK_SECONDS = 10.0


@dataclass(frozen=True)
class RankArrivals:
    """One rank's enqueue times: per group, sequence number -> time_created_ns."""

    rank: int
    node: str
    arrivals: Mapping[str, Mapping[int, int]]
    step_seconds: float | None = None
    # Per group, the first sequence number of the newest arrivals the rank sent.
    batches: Mapping[str, int] = field(default_factory=dict)

    def to_json(self, window: int = WINDOW) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "node": self.node,
            "step_seconds": self.step_seconds,
            "arrivals": {
                group: [[seq, times[seq]] for seq in served(times, self.batches.get(group), window)]
                for group, times in self.arrivals.items()
            },
        }

    @classmethod
    def from_json(cls, data: Any) -> RankArrivals:
        """Arrivals another sidecar sent; ValueError when they are not."""
        if not isinstance(data, Mapping) or not is_int(data.get("rank")):
            raise ValueError("arrivals need an int rank")
        node, step, groups = data.get("node"), data.get("step_seconds"), data.get("arrivals")
        if not isinstance(node, str) or not isinstance(groups, Mapping):
            raise ValueError("arrivals need a node and groups")
        if step is not None and not (isinstance(step, int | float) and step >= 0):
            raise ValueError("step_seconds is a number of seconds")
        parsed: dict[str, dict[int, int]] = {}
        for group, pairs in groups.items():
            if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(is_int(x) for x in p) for p in pairs
            ):
                raise ValueError(f"group {str(group)[:64]!r}: arrivals are [seq, ns] pairs")
            parsed[str(group)] = {seq: ns for seq, ns in pairs}
        return cls(data["rank"], node, parsed, None if step is None else float(step))


def served(times: Mapping[int, int], batch: int | None, window: int) -> list[int]:
    """The sequence numbers another node is sent: the newest ``window``, and the
    ``window`` before the newest batch began.

    Ranks send their arrivals at the same moments, but a node asked just as
    they do may hold one rank's newest batch and not yet another's. Should a
    batch be longer than the window, the newest alone would share no
    collective with the rank a batch behind; the ones before it do.
    """
    seqs = sorted(times)
    if batch is None:
        return seqs[-window:]
    before = [seq for seq in seqs if seq < batch][-window:]
    return sorted({*before, *seqs[-window:]})


@dataclass(frozen=True)
class RankLag:
    """A rank's median arrival lag, over ``samples`` collectives."""

    rank: int
    node: str
    lag_seconds: float
    samples: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Straggler:
    """A rank named a straggler, with its lag and the reason in a sentence."""

    rank: int
    node: str
    lag_seconds: float
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Lags:
    """Every rank's lag, and the stragglers among them."""

    ranks: list[RankLag]
    stragglers: list[Straggler]

    def to_json(self) -> dict[str, Any]:
        return {
            "ranks": [r.to_json() for r in self.ranks],
            "stragglers": [s.to_json() for s in self.stragglers],
        }


def lags(ranks: Iterable[RankArrivals]) -> Lags:
    """Each rank's median lag behind its groups' median arrival, and the stragglers."""
    views = list(ranks)
    by_group: dict[str, dict[int, Mapping[int, int]]] = {}
    for view in views:
        for group, times in view.arrivals.items():
            by_group.setdefault(group, {})[view.rank] = times
    samples: dict[int, list[float]] = {v.rank: [] for v in views}
    for members in by_group.values():
        if len(members) < 2:
            continue
        common = set.intersection(*(set(times) for times in members.values()))
        for seq in sorted(common)[-WINDOW:]:
            median = statistics.median(times[seq] for times in members.values())
            for rank, times in members.items():
                samples[rank].append((times[seq] - median) / 1e9)
    steps = [v.step_seconds for v in views if v.step_seconds]
    typical_step = statistics.median(steps) if steps else None
    measured: list[RankLag] = []
    stragglers: list[Straggler] = []
    for view in sorted(views, key=lambda v: v.rank):
        lagged = samples[view.rank]
        if not lagged:
            continue
        lag = statistics.median(lagged)
        measured.append(RankLag(view.rank, view.node, lag, len(lagged)))
        bar = max(MIN_LAG_SECONDS, STEP_FRACTION * (typical_step or 0.0))
        if len(lagged) >= MIN_SAMPLES and lag >= bar:
            against = f", {lag / typical_step:.1f}x the median step" if typical_step else ""
            reason = (
                f"arrives {lag * 1000:.0f} ms after the median rank at its collectives "
                f"(median of the last {len(lagged)}{against})"
            )
            stragglers.append(Straggler(view.rank, view.node, lag, reason))
    return Lags(measured, stragglers)


def arrivals_of(worker: Worker, node: str) -> RankArrivals | None:
    """What ``lags`` reads of ``worker``: None without a rank or arrivals."""
    if worker.rank is None or not worker.arrivals or worker.state is not WorkerState.RUNNING:
        return None
    return RankArrivals(
        worker.rank, node, worker.arrivals, worker.median_step_duration(), worker.arrivals_batch
    )


def node_arrivals(workers: WorkerTable, node: str) -> list[RankArrivals]:
    return [a for w in workers.all() if (a := arrivals_of(w, node)) is not None]


def parse_node_arrivals(answer: Any) -> list[RankArrivals]:
    """The ``arrivals`` of another node's ``GET /api/v1/stragglers?arrivals=true``."""
    listed = answer.get("arrivals") if isinstance(answer, Mapping) else None
    if not isinstance(listed, list):
        raise ValueError("no arrivals in the answer")
    return [RankArrivals.from_json(item) for item in listed]


class StragglerWatch:
    """Weighs the arrivals every CHECK_SECONDS; the lags, the gauge and the incident."""

    def __init__(
        self,
        workers: WorkerTable,
        events: EventLog,
        incidents: Incidents,
        node: str,
        job: JobScope | None = None,
    ) -> None:
        self.workers = workers
        self.events = events
        self.incidents = incidents
        self.node = node
        self.job = job
        self.latest = Lags([], [])
        self._incident: Incident | None = None
        self._next_check = 0.0

    async def job_arrivals(self) -> tuple[list[RankArrivals], list[str]]:
        """Every node's arrivals (this node's first), and the nodes that gave none."""
        mine = node_arrivals(self.workers, self.node)
        if self.job is None:
            return mine, []
        seen = {a.rank for a in mine}
        found, missing = list(mine), list[str]()
        for answer in await self.job.arrivals():
            try:
                if answer.error is not None:
                    raise ValueError(answer.error)
                theirs = parse_node_arrivals(answer.answer)
            except ValueError as exc:
                missing.append(f"{answer.url} ({exc})")
                continue
            # One node reached under two addresses (or this one) is counted once.
            found.extend(a for a in theirs if a.rank not in seen)
            seen.update(a.rank for a in theirs)
        return found, missing

    async def check(self, now: float | None = None) -> None:
        """Weigh the arrivals, if it is time; called every housekeeping round."""
        now = time.time() if now is None else now
        if now < self._next_check:
            return
        self._next_check = now + CHECK_SECONDS
        arrivals, _ = await self.job_arrivals()
        self.latest = lags(arrivals)
        by_rank = {lag.rank: lag.lag_seconds for lag in self.latest.ranks}
        for worker in self.workers.all():
            worker.collective_lag = by_rank.get(worker.rank) if worker.rank is not None else None
        own_ranks = {w.rank for w in self.workers.all() if w.rank is not None}
        mine = [s for s in self.latest.stragglers if s.rank in own_ranks]
        self._update_incident(mine, now)

    def _update_incident(self, stragglers: list[Straggler], now: float) -> None:
        current = self._incident
        named = sorted(s.rank for s in stragglers)
        if current is not None and named != [c.rank for c in current.verdict.culprits]:
            current.closed_at = now
            self.incidents.keep(current)
            self._incident = None
        if not stragglers or self._incident is not None:
            return
        culprits = [Culprit(s.rank, s.node, s.reason, Evidence.LAG) for s in stragglers]
        first = culprits[0]
        summary = (
            f"rank {first.rank} on {first.node} {first.reason}"
            if len(culprits) == 1
            else f"ranks {rank_list(named)} are stragglers; the first, rank {first.rank}, "
            f"{first.reason}"
        )
        incident = Incident(
            id=new_incident_id(IncidentKind.STRAGGLER, now),
            kind=IncidentKind.STRAGGLER,
            scope=Scope.NODE if self.job is None else Scope.JOB,
            opened_at=now,
            verdict=Verdict(culprits, summary=summary),
            collectives={},
            node=self.node,
        )
        self._incident = incident
        self.incidents.keep(incident)
        for straggler in stragglers:
            self.events.record(
                EventKind.STRAGGLER,
                f"rank {straggler.rank} is a straggler: {straggler.reason}",
                None,
                incident=incident.id,
                rank=straggler.rank,
                lag_seconds=straggler.lag_seconds,
            )
