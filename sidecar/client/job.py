"""Job-wide views: the workers, events and handler calls of several sidecars, merged.

Results from several nodes are merged by global rank (events by time), and
nodes that did not answer are reported as such rather than left out.

Written once, as pure functions: what to ask each node (``plan_call``,
``fan_out``) and how to merge what the nodes answered (``merge_workers``,
``merge_events``, ``merge_call``, ``owner_of``), each taking the answers, or
the ClientError a node gave instead, in the order of the nodes asked. Thin
shells do the asking and nothing else: ``job_workers``, ``job_events`` and
``job_call`` with blocking ``Client``s for the command line;
``job_workers_async`` and ``job_events_async`` with ``AsyncClient``s for a
sidecar's job routes, awaited on its event loop, with no thread, the
``Peers`` semaphore bounding what is in flight (the routes' one call relays
to the node ``owner_of`` names).

Why not one async implementation that the command line runs with
``asyncio.run``: the commands are blocking programs that also stream events
and read keys between refreshes, and ``top`` would open a new event loop and
new connections for every frame. The blocking shells keep one
``httpx.Client`` for a whole command and ask the nodes of a job at once from
a few threads (``parallel``); that runs in the command-line process only,
never in a sidecar's request path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypedDict, TypeVar, cast

from sidecar.client.http import (
    MAX_PARALLEL,
    AnswerError,
    AsyncClient,
    Client,
    ClientError,
    StatusError,
)
from sidecar.schema import (
    FanOutSummary,
    RankJSON,
    Reply,
    WorkerJSON,
    partial_data_text,
)
from sidecar.values import is_decimal

T = TypeVar("T")
Item = TypeVar("Item")
Answer = TypeVar("Answer")

WORKERS = "/api/v1/workers"
EVENTS = "/api/v1/events"


class NodeJSON(TypedDict):
    url: str
    ok: bool
    error: str | None
    workers: int


@dataclass
class NodeStatus:
    """One sidecar of the job, and whether it answered."""

    url: str
    ok: bool
    error: str | None = None
    workers: int = 0
    # The id of the node's newest event, when its events were read (0: none yet).
    last_event: int | None = None
    # Why it did not answer, as raised.
    failure: ClientError | None = field(default=None, repr=False, compare=False)

    @classmethod
    def failed(cls, url: str, exc: ClientError) -> NodeStatus:
        return cls(url, ok=False, error=str(exc), failure=exc)

    def to_json(self) -> NodeJSON:
        return {"url": self.url, "ok": self.ok, "error": self.error, "workers": self.workers}


class JobWorker(WorkerJSON):
    """A worker in the job view: the node it is on, and how long since its last progress."""

    node: str
    # Seconds, by the node's own clock; None before the first step.
    progress_age: float | None


class JobRank(RankJSON):
    """One rank's answer to a job-wide call, with the node that relayed it."""

    node: str
    key: str
    rank: int | None


# -- workers ------------------------------------------------------------------------


@dataclass
class JobWorkers:
    """Every worker of the job, merged by global rank, and every node asked."""

    time: float
    nodes: list[NodeStatus]
    workers: list[JobWorker] = field(default_factory=list)

    @property
    def unreachable(self) -> list[NodeStatus]:
        return [n for n in self.nodes if not n.ok]

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "nodes": [n.to_json() for n in self.nodes],
            "workers": self.workers,
        }


def rank_order(worker: Mapping[str, Any]) -> tuple[int, int, str, str]:
    """Global rank first; workers without one (not under torchrun) after, by node."""
    rank = worker.get("rank")
    if isinstance(rank, int):
        return (0, rank, str(worker.get("node", "")), str(worker.get("key")))
    return (1, 0, str(worker.get("node", "")), str(worker.get("key")))


def _workers_of(url: str, answer: Any) -> tuple[Any, list[WorkerJSON]]:
    """The node's clock and workers from its ``GET /api/v1/workers`` answer."""
    workers = answer.get("workers") if isinstance(answer, dict) else None
    if not isinstance(workers, list) or not all(isinstance(w, dict) for w in workers):
        raise AnswerError(f"{url}{WORKERS} did not answer a worker list: is it a sidecar?")
    return answer.get("time"), cast(list[WorkerJSON], workers)


def merge_workers(
    urls: Sequence[str],
    answers: Sequence[Any | ClientError],
    failed: Sequence[NodeStatus] = (),
    now: float | None = None,
) -> JobWorkers:
    """Every node's workers by global rank; each gets ``node`` and ``progress_age``.

    The age of the last progress is computed against each node's own clock, so
    clocks that disagree between nodes (or with the reader) do not skew it.
    """
    nodes = list(failed)
    merged: list[JobWorker] = []
    for url, answer in zip(urls, answers, strict=True):
        try:
            if isinstance(answer, ClientError):
                raise answer
            node_time, workers = _workers_of(url, answer)
        except ClientError as exc:
            nodes.append(NodeStatus.failed(url, exc))
            continue
        nodes.append(NodeStatus(url, ok=True, workers=len(workers)))
        for worker in workers:
            progress = worker.get("progress_time")
            age = None
            if isinstance(progress, int | float) and isinstance(node_time, int | float):
                age = max(0.0, node_time - progress)
            merged.append({**worker, "node": url, "progress_age": age})
    merged.sort(key=rank_order)
    return JobWorkers(time.time() if now is None else now, nodes, merged)


def owner_of(workers: Sequence[JobWorker], key: str) -> str | None:
    """The node running worker ``key`` (a global rank); one where it ended if none runs it."""
    holders = [w for w in workers if w.get("key") == key]
    running = [w for w in holders if w.get("state") == "running"]
    chosen = running or holders
    return str(chosen[0]["node"]) if chosen else None


# -- events -------------------------------------------------------------------------


@dataclass
class JobEvents:
    """The newest events of every node, newest first, each with its node; and every node."""

    events: list[dict[str, Any]]
    nodes: list[NodeStatus]

    def to_json(self) -> dict[str, Any]:
        return {"events": self.events, "nodes": [n.to_json() for n in self.nodes]}


def _events_of(url: str, answer: Any) -> list[dict[str, Any]]:
    events = answer.get("events") if isinstance(answer, dict) else None
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise AnswerError(f"{url}{EVENTS} did not answer an event list: is it a sidecar?")
    return events


def _number(value: Any) -> float:
    return value if isinstance(value, int | float) else 0


def merge_events(
    urls: Sequence[str],
    answers: Sequence[Any | ClientError],
    limit: int,
    failed: Sequence[NodeStatus] = (),
) -> JobEvents:
    """The newest ``limit`` events of all nodes, merged by time, newest first."""
    nodes = list(failed)
    merged: list[dict[str, Any]] = []
    for url, answer in zip(urls, answers, strict=True):
        try:
            if isinstance(answer, ClientError):
                raise answer
            events = _events_of(url, answer)
        except ClientError as exc:
            nodes.append(NodeStatus.failed(url, exc))
            continue
        ids = [e["id"] for e in events if isinstance(e.get("id"), int)]
        nodes.append(NodeStatus(url, ok=True, last_event=max(ids, default=0)))
        merged.extend({**event, "node": url} for event in events)
    merged.sort(key=lambda e: (_number(e.get("time")), _number(e.get("id"))), reverse=True)
    return JobEvents(merged[:limit], nodes)


# -- calls --------------------------------------------------------------------------


@dataclass
class JobCall:
    """A handler called on many workers across nodes: each rank's answer and each node.

    ``summary`` has the keys of one node's fan-out summary, summed over the
    nodes; what only a job has (ranks no node runs, nodes that did not
    answer) is beside it.
    """

    handler: str
    nodes: list[NodeStatus]
    ranks: dict[str, JobRank]
    summary: FanOutSummary
    missing: list[int] = field(default_factory=list)

    @property
    def unreachable(self) -> list[NodeStatus]:
        return [n for n in self.nodes if not n.ok]

    def to_json(self) -> dict[str, Any]:
        return {
            "handler": self.handler,
            "summary": self.summary,
            "missing": self.missing,
            "unreachable_nodes": len(self.unreachable),
            "nodes": [n.to_json() for n in self.nodes],
            "ranks": self.ranks,
        }


@dataclass(frozen=True)
class FanOut:
    """The fan-out request each node is sent: ``POST path?ranks=...&params``."""

    path: str
    params: tuple[tuple[str, str], ...]
    # How long to wait for a node's answer: the workers' deadline, and a little more.
    wait: float

    def params_for(self, ranks: str | None) -> list[tuple[str, str]]:
        return [*([("ranks", ranks)] if ranks is not None else []), *self.params]


def fan_out(handler: str, params: Sequence[tuple[str, str]], timeout: float | None) -> FanOut:
    query = list(params)
    if timeout is not None:
        query.append(("timeout", f"{timeout:g}"))
    path = f"/api/v1/handlers/{urllib.parse.quote(handler, safe='')}"
    return FanOut(path, tuple(query), (timeout or 30.0) + 10.0)


@dataclass(frozen=True)
class CallPlan:
    """Which nodes to ask for which ranks (None: all of a node's workers)."""

    asks: Sequence[tuple[str, str | None]]
    # The nodes as known before the calls: from the listing, when there was one.
    nodes: list[NodeStatus]
    # Ranks that no node that answered runs.
    missing: list[int]


def plan_call(
    urls: Sequence[str], ranks: Sequence[int] | None, listing: JobWorkers | None
) -> CallPlan:
    """Every node for every worker; else only the nodes running the ranks named.

    With ranks named, ``listing`` says which node runs which, so that a rank on
    another node is not reported as missing by this one.
    """
    if ranks is None or listing is None:
        return CallPlan([(u, None) for u in urls], [NodeStatus(u, ok=True) for u in urls], [])
    owners: dict[str, list[int]] = {}
    missing: list[int] = []
    for rank in ranks:
        node = owner_of(listing.workers, str(rank))
        if node is None:
            missing.append(rank)
        else:
            owners.setdefault(node, []).append(rank)
    asks = [(u, ",".join(map(str, owners[u]))) for u in urls if u in owners]
    return CallPlan(asks, list(listing.nodes), missing)


def _fan_out_of(url: str, path: str, reply: Reply) -> tuple[dict[str, RankJSON], FanOutSummary]:
    """Each rank's answer and the summary from a node's fan-out reply."""
    if reply.status != 200:
        raise StatusError(f"{url}: HTTP {reply.status}: {reply.error_text()}", reply)
    try:
        answer = reply.json()
    except ValueError:
        answer = None
    ranks = answer.get("ranks") if isinstance(answer, dict) else None
    summary = answer.get("summary") if isinstance(answer, dict) else None
    counts = ("workers", "answered", "ok", "timed_out", "unavailable")
    if (
        not isinstance(ranks, dict)
        or not all(isinstance(r, dict) for r in ranks.values())
        or not isinstance(summary, dict)
        or not all(isinstance(summary.get(k), int) for k in counts)
    ):
        raise AnswerError(f"{url}{path} did not answer a fan-out: is it a sidecar?")
    return cast(dict[str, RankJSON], ranks), cast(FanOutSummary, summary)


def add_summaries(summaries: Sequence[FanOutSummary], ranks: Sequence[JobRank]) -> FanOutSummary:
    """The nodes' fan-out summaries summed, with the text made from the merged ranks."""
    total = sum(s["workers"] for s in summaries)
    failed = [(r["key"], Reply.from_json(r)) for r in ranks if r.get("status") != 200]
    return {
        "workers": total,
        "answered": sum(s["answered"] for s in summaries),
        "ok": sum(s["ok"] for s in summaries),
        "timed_out": sum(s["timed_out"] for s in summaries),
        "unavailable": sum(s["unavailable"] for s in summaries),
        "text": partial_data_text(total, failed),
    }


def merge_call(
    handler: str,
    plan: CallPlan,
    request: FanOut,
    answers: Sequence[Reply | ClientError],
    failed: Sequence[NodeStatus] = (),
) -> JobCall:
    """Every rank's answer by global rank, each with its node, from the nodes' fan-outs."""
    nodes = {n.url: n for n in plan.nodes}
    summaries: list[FanOutSummary] = []
    results: dict[str, JobRank] = {}
    for (url, _), answer in zip(plan.asks, answers, strict=True):
        try:
            if isinstance(answer, ClientError):
                raise answer
            ranks, summary = _fan_out_of(url, request.path, answer)
        except ClientError as exc:
            nodes[url] = NodeStatus.failed(url, exc)
            continue
        nodes[url] = dataclasses.replace(nodes[url], workers=len(ranks))
        summaries.append(summary)
        for key, result in ranks.items():
            results[key] = cast(JobRank, {**result, "node": url, "key": key, "rank": _int(key)})
    ordered = sorted(results.values(), key=rank_order)
    return JobCall(
        handler,
        [*failed, *nodes.values()],
        {r["key"]: r for r in ordered},
        add_summaries(summaries, ordered),
        plan.missing,
    )


def _int(text: str) -> int | None:
    return int(text) if is_decimal(text) else None


# -- asking, blocking (the command line) ----------------------------------------------


def parallel(items: Sequence[Item], work: Callable[[Item], T]) -> list[T | ClientError]:
    """``work(item)`` for every item at once (one node each), in order.

    A ClientError raised by ``work`` is that item's result, so that one node
    that does not answer does not hide the others' answers.
    """

    def one(item: Item) -> T | ClientError:
        try:
            return work(item)
        except ClientError as exc:
            return exc

    if len(items) <= 1:
        return [one(item) for item in items]
    with ThreadPoolExecutor(min(len(items), MAX_PARALLEL)) as pool:
        return list(pool.map(one, items))


def job_workers(
    clients: Sequence[Client], failed: Sequence[NodeStatus] = (), now: float | None = None
) -> JobWorkers:
    """Ask every node for its workers; merged by ``merge_workers``."""
    answers = parallel(clients, lambda c: c.get_json(WORKERS))
    return merge_workers([c.url for c in clients], answers, failed, now)


def job_events(
    clients: Sequence[Client], limit: int, failed: Sequence[NodeStatus] = ()
) -> JobEvents:
    """Ask every node for its newest ``limit`` events; merged by ``merge_events``."""
    answers = parallel(clients, lambda c: c.get_json(EVENTS, [("limit", str(limit))]))
    return merge_events([c.url for c in clients], answers, limit, failed)


def job_call(
    clients: Sequence[Client],
    handler: str,
    ranks: Sequence[int] | None,
    params: Sequence[tuple[str, str]],
    timeout: float | None,
    failed: Sequence[NodeStatus] = (),
) -> JobCall:
    """Call ``handler`` on ``ranks`` (every worker when None) through each node's fan-out."""
    listing = None if ranks is None else job_workers(clients)
    plan = plan_call([c.url for c in clients], ranks, listing)
    request = fan_out(handler, params, timeout)
    by_url = {c.url: c for c in clients}

    def ask(item: tuple[str, str | None]) -> Reply:
        url, spec = item
        return by_url[url].request(
            "POST", request.path, request.params_for(spec), b"", request.wait
        )

    return merge_call(handler, plan, request, parallel(plan.asks, ask), failed)


# -- asking, awaited (a sidecar's job routes) -----------------------------------------


async def gather(
    items: Sequence[Item], work: Callable[[Item], Awaitable[Answer]]
) -> list[Answer | ClientError]:
    """``await work(item)`` for every item at once, in order; a ClientError is a result."""

    async def one(item: Item) -> Answer | ClientError:
        try:
            return await work(item)
        except ClientError as exc:
            return exc

    return list(await asyncio.gather(*(one(item) for item in items)))


async def job_workers_async(
    clients: Sequence[AsyncClient], failed: Sequence[NodeStatus] = (), now: float | None = None
) -> JobWorkers:
    """``job_workers``, awaited."""
    answers = await gather(clients, lambda c: c.get_json(WORKERS))
    return merge_workers([c.url for c in clients], answers, failed, now)


async def job_events_async(
    clients: Sequence[AsyncClient], limit: int, failed: Sequence[NodeStatus] = ()
) -> JobEvents:
    """``job_events``, awaited."""
    answers = await gather(clients, lambda c: c.get_json(EVENTS, [("limit", str(limit))]))
    return merge_events([c.url for c in clients], answers, limit, failed)
