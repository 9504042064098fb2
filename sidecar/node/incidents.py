"""Capturing what every worker was doing: stacks on a stall, and periodic dumps.

A training job that hangs usually hangs in a collective: one rank stops and
every other rank waits for it, with no error anywhere. So on a stall the
sidecar asks *every* worker of the node for its stacks, not only the stalled
one; the healthy ranks' stacks show what they wait for. A worker that cannot
answer (it holds the GIL in C code, or is stopped) is dumped from outside with
py-spy when it is installed and allowed to attach.
"""

from __future__ import annotations

import asyncio
import collections
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sidecar.config import Config
from sidecar.metrics import own
from sidecar.node import recorder
from sidecar.node.diagnosis import (
    RankView,
    Verdict,
    decide,
    decide_failure,
    is_time,
    positions,
)
from sidecar.node.dumps import DumpStore
from sidecar.node.events import EventKind, EventLog
from sidecar.node.fanout import Caller, fan_out
from sidecar.node.stacks import group_stacks
from sidecar.node.workers import Worker, WorkerTable
from sidecar.schema import Reply, WorkerState
from worker_hooks.pyspy import find_pyspy

PYSPY_TIMEOUT = 30.0
# Incidents kept in memory for the API, newest last.
MAX_INCIDENTS = 100
# What a stack dump is saved as, by the handler or py-spy that produced it.
_STACK_DUMPS = ("dump_traceback", "pyspy")
# stall_20261203T063012_9f3a1c: kind, opening time, and enough randomness that
# ids of different nodes and of restarts never meet.
INCIDENT_ID = re.compile(r"[a-z]{1,16}_[0-9]{8}T[0-9]{6}_[0-9a-f]{6}")


class IncidentKind(StrEnum):
    STALL = "stall"
    FAILURE = "failure"
    MANUAL = "manual"
    STRAGGLER = "straggler"


class Scope(StrEnum):
    NODE = "node"
    JOB = "job"


@dataclass
class Incident:
    """One incident: what was captured, and the verdict reached from it.

    ``views`` is what the verdict read of each rank (``ranks`` in JSON), so
    that another sidecar can weigh this node's ranks with its own; ``nodes``
    lists, for a job incident, every node asked and what it answered.
    """

    id: str
    kind: IncidentKind
    scope: Scope
    opened_at: float
    verdict: Verdict
    collectives: dict[str, dict[str, dict[str, Any]]]
    node: str = ""
    views: list[RankView] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)
    dumps: list[str] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    closed_at: float | None = None
    # False for a job verdict another node reached and sent here: only the
    # node that decided shows its culprits in metrics, so an alert fires once.
    decided_here: bool = True

    def to_json(self, evidence: bool = True) -> dict[str, Any]:
        """The incident; without ``evidence``, not each rank's view and positions
        (what a job's verdict is sent to the other nodes as: the node that decided
        keeps them, and they would grow the verdict with every rank of the job)."""
        verdict = self.verdict.to_json()
        return {
            "id": self.id,
            "kind": self.kind,
            "scope": self.scope,
            "node": self.node,
            "opened_at": self.opened_at,
            "closed_at": self.closed_at,
            "culprits": verdict["culprits"],
            "followers": verdict["followers"],
            "summary": verdict["summary"],
            "waits": verdict["waits"],
            "groups": self.groups,
            "collectives": self.collectives if evidence else {},
            "ranks": [v.to_json() for v in self.views] if evidence else [],
            "dumps": self.dumps,
            "nodes": self.nodes,
        }

    @classmethod
    def from_json(cls, data: Any) -> Incident:
        """An incident another sidecar sent; ValueError when it is not one."""
        if not isinstance(data, Mapping):
            raise ValueError("an incident is a JSON object")
        incident_id, opened_at = data.get("id"), data.get("opened_at")
        if not isinstance(incident_id, str) or not INCIDENT_ID.fullmatch(incident_id):
            raise ValueError("an incident needs an id like stall_20261203T063012_9f3a1c")
        if not is_time(opened_at):
            raise ValueError("an incident needs opened_at, a time")
        parts = {k: data.get(k, []) for k in ("groups", "dumps", "nodes", "ranks")}
        if not all(isinstance(v, list) for v in parts.values()):
            raise ValueError("groups, dumps, nodes and ranks are lists")
        collectives = data.get("collectives", {})
        node = data.get("node", "")
        if not isinstance(collectives, Mapping) or not isinstance(node, str):
            raise ValueError("collectives is an object and node is text")
        return cls(
            id=incident_id,
            kind=IncidentKind(str(data.get("kind"))),
            scope=Scope(str(data.get("scope"))),
            opened_at=float(data["opened_at"]),
            verdict=Verdict.from_json(data),
            collectives=dict(collectives),
            node=node,
            views=[RankView.from_json(v) for v in parts["ranks"]],
            groups=list(parts["groups"]),
            dumps=[str(d) for d in parts["dumps"]],
            nodes=list(parts["nodes"]),
            decided_here=False,
        )


def new_incident_id(prefix: str, now: float | None = None) -> str:
    """A fresh id, unique across nodes and restarts, that sorts by opening time."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{prefix}_{stamp}_{secrets.token_hex(3)}"


class Incidents:
    """Captures dumps of every running worker into the dump store."""

    def __init__(
        self,
        caller: Caller,
        workers: WorkerTable,
        store: DumpStore,
        event_log: EventLog,
        config: Config,
    ) -> None:
        self.caller = caller
        self.workers = workers
        self.store = store
        self.events = event_log
        self.config = config
        self.pyspy = find_pyspy() if config.pyspy else None
        self.node = config.node
        self.records: collections.deque[Incident] = collections.deque(maxlen=MAX_INCIDENTS)
        # Dump ids and stacks saved per incident while its capture runs.
        self._saved: dict[str, list[str]] = {}
        self._stacks: dict[str, dict[str, bytes]] = {}
        # Workers that answered dump_traceback themselves, per incident.
        self._answered: dict[str, set[str]] = {}
        # Captures run one at a time, so that two incidents (or an incident and
        # a periodic dump) never race each other's calls into the same workers.
        self._lock = asyncio.Lock()

    def get(self, incident_id: str) -> Incident | None:
        return next((i for i in self.records if i.id == incident_id), None)

    def newest_first(self) -> list[Incident]:
        return list(reversed(self.records))

    def open_incidents(self) -> list[Incident]:
        return [i for i in self.records if i.closed_at is None]

    def close_open(self, kind: IncidentKind, now: float) -> None:
        """Close the open incidents of ``kind`` (every stalled worker went on)."""
        for incident in self.open_incidents():
            if incident.kind is kind:
                incident.closed_at = now
        self._show_culprits()

    def keep(self, incident: Incident) -> None:
        """Keep ``incident``, in place of one of the same id (a job verdict replaces
        this node's part of it, keeping this node's dumps and closing time)."""
        old = self.get(incident.id)
        if old is not None:
            self.records.remove(old)
            if old.closed_at is not None and incident.closed_at is None:
                incident.closed_at = old.closed_at
        self.records.append(incident)
        self._show_culprits()

    def drop(self, incident_id: str) -> None:
        """Forget ``incident_id`` (given up for another node's incident of the same hang)."""
        incident = self.get(incident_id)
        if incident is not None:
            self.records.remove(incident)
            self._show_culprits()

    def _show_culprits(self) -> None:
        own.set_culprits(
            c.rank for i in self.open_incidents() if i.decided_here for c in i.verdict.culprits
        )

    async def investigate(
        self, incident_id: str, kind: IncidentKind, keep: bool = True
    ) -> Incident:
        """Capture every running worker's stacks, and reach a verdict for the node.

        ``keep``: list the incident here (else it is only answered, to the
        node that asked for it).
        """
        opened_at = time.time()
        self._saved[incident_id] = []
        self._stacks[incident_id] = {}
        self._answered[incident_id] = set()
        try:
            await self.capture(incident_id, ("dump_traceback",))
            # A worker that could not answer for its stacks (it holds the GIL,
            # or is stopped) would cost the timeout twice: it is not asked again.
            recent = await self.capture_recorder(incident_id, self._answered[incident_id])
            dumps = self._saved[incident_id]
            stacks = self._stacks[incident_id]
        finally:
            self._saved.pop(incident_id, None)
            self._stacks.pop(incident_id, None)
            self._answered.pop(incident_id, None)
        # A failure is read from the ranks that ended too; a hang from the living.
        ranked = [w for w in self.workers.all() if w.rank is not None]
        silence = silent_limit(ranked, time.time())
        views = [view_of(w, self.node, silence, recent) for w in ranked]
        rank_of = {w.key: view.rank for w, view in zip(ranked, views, strict=True)}
        rank_stacks = {
            rank_of[key]: text.decode(errors="replace")
            for key, text in stacks.items()
            if key in rank_of
        }
        groups = group_stacks(rank_stacks)
        incident = Incident(
            id=incident_id,
            kind=kind,
            scope=Scope.NODE,
            opened_at=opened_at,
            verdict=verdict_of(kind, views, groups),
            collectives={str(v.rank): positions(v.collectives) for v in views},
            node=self.node,
            views=views,
            groups=groups,
            dumps=dumps,
        )
        if keep:
            self.keep(incident)
        return incident

    async def capture(self, incident: str, handlers: tuple[str, ...]) -> None:
        """Call ``handlers`` on every running worker and keep what comes back."""
        async with self._lock:
            await self._capture(incident, handlers)

    async def capture_recorder(
        self, incident: str, keys: set[str] | None = None
    ) -> recorder.Recent:
        """Every rank's flight recorder, or that of ``keys``: dumps and newest ops.

        The dumps are kept for torchfrtrace; the newest ops go to the verdict.
        """
        async with self._lock:
            running = [
                w
                for w in self.workers.all()
                if w.state is WorkerState.RUNNING and (keys is None or w.key in keys)
            ]
            timeout = self.config.dump_timeout
            saved, recent = await recorder.capture(
                self.caller, running, self.store, self.events, incident, timeout, self._save_result
            )
        if incident in self._saved:
            self._saved[incident].extend(saved)
        return recent

    async def _capture(self, incident: str, handlers: tuple[str, ...]) -> None:
        workers = [w for w in self.workers.all() if w.state is WorkerState.RUNNING]
        keys = [w.key for w in workers]
        for handler in handlers:
            results = await fan_out(self.caller, keys, handler, [], b"", self.config.dump_timeout)
            silent = [w for w in workers if not results[w.key].answered]
            for key, result in results.items():
                await self._save_result(incident, key, handler, result)
            if handler == "dump_traceback" and silent:
                await asyncio.gather(*(self._pyspy_dump(incident, w) for w in silent))

    async def _save_result(self, incident: str, key: str, handler: str, result: Reply) -> None:
        if result.answered and result.status == 200:
            await self._save(incident, key, handler, result.body, result.content_type)
            return
        note = (
            f"worker {key} did not answer {handler} within {self.config.dump_timeout:g} s: "
            f"{result.status} {result.body.decode(errors='replace')}\n"
        )
        await self._save(incident, key, f"{handler}_no_answer", note.encode(), "text/plain")

    async def _pyspy_dump(self, incident: str, worker: Worker) -> None:
        if not self.config.pyspy:
            return
        # The pid the kernel gave for the worker's socket, never the one its
        # hello claims: a peer must not point py-spy at another process.
        link = worker.link
        pid = link.peer_pid if link is not None else None
        if pid is None or self.pyspy is None:
            why = (
                "its process is not visible here (another pid namespace: a container)"
                if pid is None
                else "py-spy is not installed beside the sidecar (or set RANKSIDE_PYSPY)"
            )
            note = f"no py-spy dump of worker {worker.key}: {why}\n"
            await self._save(incident, worker.key, "pyspy_failed", note.encode(), "text/plain")
            return
        args = [self.pyspy, "dump", "--pid", str(pid)]
        if self.config.pyspy_native:
            args.append("--native")
        try:
            # An argument list, never a shell: nothing here is parsed by sh.
            proc = await asyncio.create_subprocess_exec(
                *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            try:
                out, err = await asyncio.wait_for(proc.communicate(), PYSPY_TIMEOUT)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                out, err = b"", f"py-spy timed out after {PYSPY_TIMEOUT:g} s".encode()
        except OSError as exc:
            out, err = b"", f"could not run py-spy: {exc}".encode()
        if out and proc.returncode == 0:
            await self._save(incident, worker.key, "pyspy", out, "text/plain")
        else:
            await self._save(incident, worker.key, "pyspy_failed", err or out, "text/plain")

    async def _save(
        self, incident: str, key: str, what: str, content: bytes, content_type: str
    ) -> None:
        try:
            dump = await asyncio.to_thread(
                self.store.save, incident, key, what, content, content_type
            )
        except OSError as exc:
            self.events.record(
                EventKind.DUMP_FAILED,
                f"could not write the {what} dump of worker {key}: {exc}",
                key,
                incident=incident,
            )
            return
        own.DUMPS.inc()
        if incident in self._saved:
            self._saved[incident].append(dump.id)
            if what in _STACK_DUMPS:
                self._stacks[incident][key] = content
            if what == "dump_traceback" and incident in self._answered:
                self._answered[incident].add(key)


def verdict_of(kind: IncidentKind, views: list[RankView], groups: list[dict[str, Any]]) -> Verdict:
    """A failure's verdict is the order of the ends; any other's, the evidence in order
    (the stack groups too in a stall, where every rank has stopped)."""
    if kind is IncidentKind.FAILURE:
        return decide_failure(views)
    return decide(views, groups if kind is IncidentKind.STALL else ())


# A rank counts as silent when its last heartbeat is this much older than the
# typical rank's, and at least SILENT_MIN seconds old (three default heartbeats).
SILENT_FACTOR = 3.0
SILENT_MIN = 3.0


def silent_limit(workers: list[Worker], now: float) -> tuple[float, float]:
    """``(now, seconds)``: heartbeats older than ``seconds`` have stopped."""
    ages = sorted(now - w.last_seen for w in workers if w.state is WorkerState.RUNNING)
    # The lower median: with two ranks, the silent one must not set the bar.
    typical = ages[(len(ages) - 1) // 2] if ages else 0.0
    return now, max(SILENT_MIN, SILENT_FACTOR * typical)


def view_of(
    worker: Worker,
    node: str,
    silence: tuple[float, float],
    recent: recorder.Recent | None = None,
) -> RankView:
    """What the verdict reads of ``worker`` (which has a rank), with its newest ops if read."""
    assert worker.rank is not None
    now, limit = silence
    age = now - worker.last_seen
    stopped = None
    flagged = (worker.stall_reason or "").startswith("no heartbeat")
    if worker.state is WorkerState.RUNNING and (age > limit or flagged):
        stopped = f"sent no heartbeat for {age:.1f} s while its connection stayed open"
    return RankView(
        rank=worker.rank,
        node=node,
        collectives=worker.collectives,
        state=worker.state,
        exit=worker.exit,
        heartbeat_stopped=stopped,
        ended_at=worker.ended_at,
        recent=(recent or {}).get(worker.rank, {}),
    )
