"""The verdict of an incident: which ranks are the culprits, and why.

Pure functions over what the sidecar already knows of each rank, so that the
same verdict comes from a node's workers or from a whole job's. The evidence
is weighed in a fixed order, and the first kind that singles ranks out decides:

1. collective progress: in some process group, the ranks whose last enqueued
   collective is behind the others' (the others wait in one it never joined);
2. exit and connection state: a rank that exited with an error or vanished;
3. heartbeats: a rank whose heartbeats stopped while its connection stayed open.

Where none singles a rank out, the verdict says so rather than guess.
"""

from __future__ import annotations

from collections.abc import Iterable
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


@dataclass(frozen=True)
class Culprit:
    """A rank the evidence names, with the reason in a sentence."""

    rank: int
    node: str
    reason: str
    evidence: Evidence

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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


@dataclass(frozen=True)
class Verdict:
    """The culprits, the collectives others wait in, and one line to act on."""

    culprits: list[Culprit]
    waits: list[Wait] = field(default_factory=list)
    summary: str = ""


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
            if view.state is WorkerState.DISCONNECTED:
                reason = "disconnected without saying goodbye"
            elif view.state is WorkerState.EXITED and view.exit is not None:
                if view.exit.get("reason") == "exception":
                    reason = f"failed: {view.exit.get('exc_type')}: {view.exit.get('exc_message')}"
                else:
                    reason = f"exited (code {view.exit.get('exit_code', 0)}) while others ran"
            else:
                continue
            culprits[view.rank] = Culprit(view.rank, view.node, reason, Evidence.EXIT)
    if not culprits:
        for view in ranks:
            if view.heartbeat_stopped is not None:
                culprits[view.rank] = Culprit(
                    view.rank, view.node, view.heartbeat_stopped, Evidence.HEARTBEAT
                )
    named = sorted(culprits.values(), key=lambda c: c.rank)
    return Verdict(named, waits, summarize(named, len(ranks)))


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
