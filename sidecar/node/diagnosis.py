"""The verdict of an incident: which ranks are the culprits, and why.

Pure functions over what the sidecar already knows of each rank, so that the
same verdict comes from a node's workers or from a whole job's. The evidence
is weighed in a fixed order, and the first kind that singles ranks out decides:

1. collective progress: in some process group, the ranks whose last enqueued
   collective is behind the others' (the others wait in one it never joined);
2. exit and connection state: a rank that exited with an error or vanished;
3. heartbeats: a rank whose heartbeats stopped while its connection stayed open.

Where none singles a rank out, the verdict says so rather than guess.

A failure is weighed differently (``decide_failure``): when ranks end with
errors, the rank that ended first is the culprit and the ranks that ended
after it are its followers, since on gloo one rank's exit makes every peer fail.

Rank views and verdicts travel between the sidecars of a job as JSON
(``to_json`` / ``from_json``), so the job's verdict is this same code run over
every node's ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from sidecar.schema import WorkerState


class Evidence(StrEnum):
    """What named a culprit, strongest first."""

    COLLECTIVE = "collective"
    EXIT = "exit"
    HEARTBEAT = "heartbeat"


@dataclass(frozen=True)
class RankView:
    """What the verdict reads of one rank."""

    rank: int
    node: str
    # Per process group name: desc, ranks, enqueued, started, completed.
    collectives: dict[str, dict[str, Any]]
    state: WorkerState
    exit: dict[str, Any] | None = None
    heartbeat_stopped: str | None = None
    # When the rank's worker exited or disconnected (wall clock), if it did.
    ended_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> RankView:
        """A view another sidecar sent; ValueError when it is not one."""
        if not isinstance(data, Mapping):
            raise ValueError("a rank view is not an object")
        rank, node = data.get("rank"), data.get("node")
        collectives, exit_info = data.get("collectives"), data.get("exit")
        stopped, ended = data.get("heartbeat_stopped"), data.get("ended_at")
        if not is_int(rank) or not isinstance(node, str):
            raise ValueError("a rank view needs an int rank and a node name")
        if not isinstance(collectives, Mapping) or not all(
            isinstance(p, Mapping) and is_int(p.get("enqueued")) for p in collectives.values()
        ):
            raise ValueError(f"rank {rank}: collectives are not positions by group")
        if exit_info is not None and not isinstance(exit_info, Mapping):
            raise ValueError(f"rank {rank}: exit is not an object")
        if stopped is not None and not isinstance(stopped, str):
            raise ValueError(f"rank {rank}: heartbeat_stopped is not text")
        if ended is not None and not is_time(ended):
            raise ValueError(f"rank {rank}: ended_at is not a time")
        return cls(
            rank=data["rank"],
            node=node,
            collectives={str(k): dict(v) for k, v in collectives.items()},
            state=WorkerState(str(data.get("state"))),
            exit=None if exit_info is None else dict(exit_info),
            heartbeat_stopped=stopped,
            ended_at=ended,
        )


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Culprit:
    """A rank the evidence names, with the reason in a sentence."""

    rank: int
    node: str
    reason: str
    evidence: Evidence

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Culprit:
        if not isinstance(data, Mapping) or not is_int(data.get("rank")):
            raise ValueError("a culprit needs an int rank")
        node, reason = data.get("node"), data.get("reason")
        if not isinstance(node, str) or not isinstance(reason, str):
            raise ValueError("a culprit needs a node and a reason")
        return cls(data["rank"], node, reason, Evidence(str(data.get("evidence"))))


@dataclass(frozen=True)
class Wait:
    """A collective that ranks wait in: group, sequence number, who waits, who is missing."""

    group: str
    desc: str
    seq: int
    waiting: list[int]
    missing: list[int]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Wait:
        if not isinstance(data, Mapping):
            raise ValueError("a wait is not an object")
        group, desc, seq = data.get("group"), data.get("desc"), data.get("seq")
        waiting, missing = data.get("waiting"), data.get("missing")
        if not (isinstance(group, str) and isinstance(desc, str) and is_int(seq)):
            raise ValueError("a wait needs a group, a desc and an int seq")
        for ranks in (waiting, missing):
            if not isinstance(ranks, list) or not all(is_int(r) for r in ranks):
                raise ValueError("a wait's waiting and missing are lists of ranks")
        return cls(group, desc, seq, list(waiting), list(missing))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Verdict:
    """The culprits, the collectives others wait in, and one line to act on.

    ``followers``: in a failure, the ranks that ended after the culprit did.
    """

    culprits: list[Culprit]
    waits: list[Wait] = field(default_factory=list)
    summary: str = ""
    followers: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "culprits": [c.to_json() for c in self.culprits],
            "waits": [w.to_json() for w in self.waits],
            "summary": self.summary,
            "followers": self.followers,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Verdict:
        """The verdict part of an incident another sidecar sent; ValueError if malformed."""
        culprits, waits = data.get("culprits"), data.get("waits", [])
        summary, followers = data.get("summary"), data.get("followers", [])
        if not isinstance(culprits, list) or not isinstance(waits, list):
            raise ValueError("culprits and waits are lists")
        if not isinstance(summary, str):
            raise ValueError("summary is text")
        if not isinstance(followers, list) or not all(is_int(r) for r in followers):
            raise ValueError("followers is a list of ranks")
        return cls(
            [Culprit.from_json(c) for c in culprits],
            [Wait.from_json(w) for w in waits],
            summary,
            list(followers),
        )


def rank_list(ranks: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``: a rank list a person reads at 512 ranks."""
    runs: list[list[int]] = []
    for rank in sorted(set(ranks)):
        if runs and rank == runs[-1][1] + 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def collective_waits(ranks: list[RankView]) -> list[Wait]:
    """Per group, the collective the furthest ranks wait in and the ranks behind it."""
    by_group: dict[str, dict[int, dict[str, Any]]] = {}
    for view in ranks:
        for name, position in view.collectives.items():
            by_group.setdefault(name, {})[view.rank] = position
    waits: list[Wait] = []
    for name, members in sorted(by_group.items()):
        front = max(p["enqueued"] for p in members.values())
        ahead = sorted(r for r, p in members.items() if p["enqueued"] == front)
        behind = sorted(r for r, p in members.items() if p["enqueued"] < front)
        # Ranks the group lists that report nothing here (on another node, or
        # gone) are missing too, but only the ranks seen can be judged.
        if behind:
            desc = next((p.get("desc", "") for p in members.values() if p.get("desc")), "")
            waits.append(Wait(name, desc, front, ahead, behind))
    return waits


def decide(ranks: list[RankView]) -> Verdict:
    """Name the culprits among ``ranks`` from the strongest evidence that singles some out."""
    by_rank = {view.rank: view for view in ranks}
    waits = collective_waits(ranks)
    culprits: dict[int, Culprit] = {}
    for wait in waits:
        group = f"group {wait.group}" + (f" ({wait.desc})" if wait.desc else "")
        for rank in wait.missing:
            if rank in culprits:
                continue
            last = by_rank[rank].collectives[wait.group]["enqueued"]
            reason = (
                f"has not entered collective #{wait.seq} of {group}, where ranks "
                f"{rank_list(wait.waiting)} wait; its last is #{last}"
            )
            culprits[rank] = Culprit(rank, by_rank[rank].node, reason, Evidence.COLLECTIVE)
    if not culprits:
        for view in ranks:
            ending = how_it_ended(view)
            if ending is not None:
                reason = ending + ("" if is_failure(view.state, view.exit) else " while others ran")
                culprits[view.rank] = Culprit(view.rank, view.node, reason, Evidence.EXIT)
    if not culprits:
        for view in ranks:
            if view.heartbeat_stopped is not None:
                culprits[view.rank] = Culprit(
                    view.rank, view.node, view.heartbeat_stopped, Evidence.HEARTBEAT
                )
    named = sorted(culprits.values(), key=lambda c: c.rank)
    return Verdict(named, waits, summarize(named, len(ranks)))


def how_it_ended(view: RankView) -> str | None:
    """``failed: ValueError: ...``, ``exited (code 0)``: None while the rank runs."""
    if view.state is WorkerState.DISCONNECTED:
        return "disconnected without saying goodbye"
    if view.state is WorkerState.EXITED:
        info = view.exit or {}
        if info.get("reason") == "exception":
            return f"failed: {info.get('exc_type')}: {info.get('exc_message')}"
        return f"exited (code {info.get('exit_code', 0)})"
    return None


def is_failure(state: WorkerState, exit_info: Mapping[str, Any] | None) -> bool:
    """A rank that ended badly: an exception, a non-zero code, or no goodbye."""
    if state is WorkerState.DISCONNECTED:
        return True
    info = exit_info or {}
    return state is WorkerState.EXITED and (
        info.get("reason") == "exception" or info.get("exit_code", 0) != 0
    )


def decide_failure(ranks: list[RankView]) -> Verdict:
    """The rank that ended first is the culprit; those that ended after it follow.

    On gloo, one rank's exit (even a clean one, too early) makes every peer
    fail with ``Connection closed by peer``, and each node's torchrun blames a
    rank of its own; the order of the ends is what tells them apart. Ends on
    different nodes are compared by wall clock (docs/diagnosis.md says how far
    that is trusted).
    """
    ended = sorted((v for v in ranks if v.ended_at is not None), key=lambda v: v.ended_at or 0.0)
    if not ended or not any(is_failure(v.state, v.exit) for v in ended):
        return Verdict([], summary=f"no rank of the {len(ranks)} seen ended with an error")
    first = ended[0]
    followers = [v.rank for v in ended[1:]]
    reason = f"ended first: {how_it_ended(first)}"
    if followers:
        gap = (ended[1].ended_at or 0.0) - (first.ended_at or 0.0)
        reason += f"; {len(followers)} ranks ended after it, the next {gap:.2f} s later"
    culprit = Culprit(first.rank, first.node, reason, Evidence.EXIT)
    summary = summarize([culprit], len(ranks))
    if followers:
        summary += f" (followers: ranks {rank_list(followers)})"
    return Verdict([culprit], summary=summary, followers=followers)


def summarize(culprits: list[Culprit], seen: int) -> str:
    """One line a person can act on."""
    if not culprits:
        return (
            f"no rank singled out among the {seen} ranks seen: collective positions, exits "
            "and heartbeats agree; compare the stack groups"
        )
    if len(culprits) == 1:
        culprit = culprits[0]
        return f"rank {culprit.rank} on {culprit.node or 'this node'} {culprit.reason}"
    first = culprits[0]
    ranks = rank_list(c.rank for c in culprits)
    return f"ranks {ranks} are named; the first, rank {first.rank}, {first.reason}"
