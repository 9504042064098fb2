"""The worker table: the sidecar's view of every worker on the node, by key.

A ``Worker`` is what the sidecar last heard from one process: its identity
from ``hello``, its progress from heartbeats, its state, and the link that
carries calls to it while it is connected. The ``WorkerTable`` keeps them
by key, replaces a worker whose key reconnects, and forgets ended ones after
their grace period. Only the event loop touches either.
"""

from __future__ import annotations

import collections
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from sidecar.node.relay import RelayError
from sidecar.schema import Reply, WorkerJSON, WorkerState

STEP_SAMPLES = 64
# Fewer samples than this say nothing reliable about a typical step.
MIN_STEP_SAMPLES = 3


class WorkerLink(Protocol):
    """What the table and the callers need of a worker's connection."""

    @property
    def peer_pid(self) -> int | None:
        """The pid the kernel gave for the socket's peer; None when not visible here."""

    async def call(
        self, handler: str, params: list[tuple[str, str]], body: bytes, timeout: float
    ) -> Reply:
        """Relay one call and wait up to ``timeout`` seconds for its reply."""

    def fail_pending(self, error: RelayError) -> None:
        """Fail every call still waiting for a reply on this link."""


def worker_key(identity: dict[str, Any]) -> str:
    """A worker is addressed by its global rank, or ``pid-<pid>`` without one."""
    rank = identity.get("rank")
    if isinstance(rank, int) and not isinstance(rank, bool):
        return str(rank)
    return f"pid-{identity.get('pid')}"


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any, default: str = "") -> str:
    return value if isinstance(value, str) else default


# Arrivals kept per group and rank: the lag is a median over the newest ones.
KEPT_ARRIVALS = 512
KEPT_ARRIVAL_GROUPS = 64


@dataclass
class Worker:
    """One worker as last heard from. Only the event loop mutates it."""

    key: str
    rank: int | None
    local_rank: int | None
    world_size: int | None
    local_world_size: int | None
    group_rank: int | None
    role: str
    pid: int
    hostname: str
    run_id: str
    restart_count: int
    connected_at: float
    last_seen: float
    state: WorkerState = WorkerState.RUNNING
    step: int | None = None
    steps: int = 0
    progress_time: float | None = None
    ended_at: float | None = None
    exit: dict[str, Any] | None = None
    handlers: list[str] = field(default_factory=list)
    # Per process group (by name), the flight recorder's position as the last
    # heartbeat carried it, and when its enqueued sequence number last moved.
    collectives: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per process group, when this rank enqueued each of its newest collectives
    # (seq -> time_created_ns), for the arrival lag (sidecar/node/stragglers.py).
    arrivals: dict[str, dict[int, int]] = field(default_factory=dict)
    # Per process group, the first sequence number of the newest arrivals sent.
    arrivals_batch: dict[str, int] = field(default_factory=dict)
    # Its median arrival lag behind the group, as last weighed; None: not known.
    collective_lag: float | None = None
    link: WorkerLink | None = field(default=None, repr=False)
    # Stall detection: set by the stall detector, read by the API and metrics.
    stalled_since: float | None = None
    stall_reason: str | None = None
    # Recent seconds per step, from heartbeats, for the typical step duration.
    step_durations: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=STEP_SAMPLES), repr=False
    )

    def record_progress(self, step: int, steps: int, progress_time: float) -> None:
        """Apply a heartbeat's progress and sample the time per step since the last."""
        if steps > self.steps and self.progress_time is not None and progress_time:
            per_step = (progress_time - self.progress_time) / (steps - self.steps)
            if per_step >= 0:
                self.step_durations.append(per_step)
        self.step = step if steps > 0 else None
        self.steps = steps
        self.progress_time = progress_time or None

    def record_arrivals(self, groups: dict[str, list[tuple[int, int]]]) -> None:
        """Keep the newest KEPT_ARRIVALS arrivals of each of at most KEPT_ARRIVAL_GROUPS groups."""
        for name, pairs in groups.items():
            if name not in self.arrivals and len(self.arrivals) >= KEPT_ARRIVAL_GROUPS:
                continue
            kept = self.arrivals.setdefault(name, {})
            kept.update(pairs)
            if pairs:
                self.arrivals_batch[name] = min(seq for seq, _ in pairs)
            if len(kept) > KEPT_ARRIVALS:
                for seq in sorted(kept)[: len(kept) - KEPT_ARRIVALS]:
                    del kept[seq]

    def record_collectives(self, groups: dict[str, dict[str, Any]], now: float) -> None:
        """Apply a heartbeat's collective positions (validated by the protocol)."""
        previous = self.collectives
        for name, group in groups.items():
            before = previous.get(name)
            if before is None or before["enqueued"] != group["enqueued"]:
                group["enqueued_changed_at"] = now
            else:
                group["enqueued_changed_at"] = before["enqueued_changed_at"]
        self.collectives = groups

    def median_step_duration(self) -> float | None:
        if len(self.step_durations) < MIN_STEP_SAMPLES:
            return None
        return statistics.median(self.step_durations)

    def steps_per_second(self) -> float | None:
        """The typical training speed: the inverse of the median step duration."""
        median = self.median_step_duration()
        return 1.0 / median if median else None

    @classmethod
    def from_hello(cls, identity: dict[str, Any], handlers: list[str], now: float) -> Worker:
        return cls(
            key=worker_key(identity),
            rank=_opt_int(identity.get("rank")),
            local_rank=_opt_int(identity.get("local_rank")),
            world_size=_opt_int(identity.get("world_size")),
            local_world_size=_opt_int(identity.get("local_world_size")),
            group_rank=_opt_int(identity.get("group_rank")),
            role=_str(identity.get("role"), "default"),
            pid=_opt_int(identity.get("pid")) or 0,
            hostname=_str(identity.get("hostname")),
            run_id=_str(identity.get("run_id")),
            restart_count=_opt_int(identity.get("restart_count")) or 0,
            connected_at=now,
            last_seen=now,
            handlers=[h for h in handlers if isinstance(h, str)],
        )

    def to_json(self, resident_memory_bytes: float | None = None) -> WorkerJSON:
        """The worker as the API lists it; its memory comes from its pushed metrics."""
        return {
            "key": self.key,
            "rank": self.rank,
            "local_rank": self.local_rank,
            "world_size": self.world_size,
            "local_world_size": self.local_world_size,
            "group_rank": self.group_rank,
            "role": self.role,
            "pid": self.pid,
            "hostname": self.hostname,
            "run_id": self.run_id,
            "restart_count": self.restart_count,
            "state": self.state,
            "connected_at": self.connected_at,
            "last_seen": self.last_seen,
            "step": self.step,
            "steps": self.steps,
            "progress_time": self.progress_time,
            "ended_at": self.ended_at,
            "exit": self.exit,
            "handlers": self.handlers,
            "collectives": self.collectives,
            "stalled": self.stalled_since is not None,
            "stalled_since": self.stalled_since,
            "stall_reason": self.stall_reason,
            "median_step_seconds": self.median_step_duration(),
            "steps_per_second": self.steps_per_second(),
            "resident_memory_bytes": resident_memory_bytes,
        }


class WorkerTable:
    """Workers by key. Ended workers stay listed for ``grace`` seconds."""

    def __init__(self, grace: float = 300.0) -> None:
        self.grace = grace
        self._workers: dict[str, Worker] = {}

    def __len__(self) -> int:
        return len(self._workers)

    def get(self, key: str) -> Worker | None:
        return self._workers.get(key)

    def all(self) -> list[Worker]:
        # No pruning here: only housekeeping prunes, so that every forgotten
        # worker's metric series are forgotten with it.
        return sorted(self._workers.values(), key=_sort_key)

    def connected(self) -> int:
        return sum(1 for w in self._workers.values() if w.state is WorkerState.RUNNING)

    def register(self, worker: Worker) -> Worker | None:
        """Add ``worker``, replacing (and returning) an older entry with its key."""
        previous = self._workers.get(worker.key)
        self._workers[worker.key] = worker
        return previous

    def is_current(self, worker: Worker) -> bool:
        return self._workers.get(worker.key) is worker

    def end(self, worker: Worker, state: WorkerState, now: float) -> None:
        """Mark a worker ended; a later ``bye`` or close does not overwrite ``exited``."""
        if worker.state is not WorkerState.RUNNING:
            return
        worker.state = state
        worker.ended_at = now
        worker.link = None
        worker.stalled_since = None
        worker.stall_reason = None

    def prune(self, now: float | None = None) -> list[Worker]:
        """Forget workers that ended more than ``grace`` seconds ago."""
        now = time.time() if now is None else now
        gone = [
            w
            for w in self._workers.values()
            if w.ended_at is not None and now - w.ended_at > self.grace
        ]
        for w in gone:
            del self._workers[w.key]
        return gone


def _sort_key(worker: Worker) -> tuple[int, int, str]:
    if worker.rank is not None:
        return (0, worker.rank, worker.key)
    return (1, worker.pid, worker.key)
