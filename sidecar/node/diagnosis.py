"""The verdict of an incident: which ranks are the culprits, and why.

Pure functions over what the sidecar already knows of each rank, so that the
same verdict comes from a node's workers or from a whole job's. The evidence
is weighed in a fixed order, and the first kind that singles ranks out decides:

1. collective progress: in some process group, the ranks whose last enqueued
   collective is behind the others' (the others wait in one it never joined),
   or that enqueued another op than the others at the same sequence number;
2. exit and connection state: a rank that exited with an error or vanished;
3. heartbeats: a rank whose heartbeats stopped while its connection stayed open.

Where none singles a rank out, the verdict says so rather than guess.
"""

from __future__ import annotations

from collections import Counter
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
class Enqueued:
    """One collective a rank enqueued, from its flight recorder at incident time."""

    seq: int
    op: str
    # Where the program called it, ``train.py:41``; "" when unknown.
    site: str = ""
    p2p: bool = False


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
    # Per process group name, its newest collectives, when the rank answered.
    recent: dict[str, list[Enqueued]] = field(default_factory=dict)


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
    # The op (``all_reduce``) and the call site of the waiting ranks, "" when unknown.
    op: str = ""
    site: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def collective(self) -> str:
        """``all_reduce #37 of group 0 (default_pg) called at train.py:41``."""
        return describe_collective(self.op, self.seq, self.group, self.desc, self.site)


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


def group_label(group: str, desc: str) -> str:
    """``group 0 (default_pg)``."""
    return f"group {group}" + (f" ({desc})" if desc else "")


def describe_collective(op: str, seq: int, group: str, desc: str, site: str = "") -> str:
    """``all_reduce #37 of group 0 (default_pg) called at train.py:41``, with what is known."""
    where = f" called at {site}" if site else ""
    return f"{op or 'collective'} #{seq} of {group_label(group, desc)}{where}"


def _ops_at(ranks: Iterable[RankView], group: str) -> dict[int, dict[int, Enqueued]]:
    """Per sequence number of ``group``, each rank's collective (point-to-point ops aside)."""
    at: dict[int, dict[int, Enqueued]] = {}
    for view in ranks:
        for entry in view.recent.get(group, []):
            if not entry.p2p:
                at.setdefault(entry.seq, {})[view.rank] = entry
    return at


def _majority(entries: dict[int, Enqueued]) -> tuple[str, list[int]] | None:
    """The op more than half of these ranks enqueued, and those ranks; None without one."""
    counts = Counter(e.op for e in entries.values())
    op, count = counts.most_common(1)[0] if counts else ("", 0)
    if count < 2 or count * 2 <= len(entries):
        return None
    return op, sorted(r for r, e in entries.items() if e.op == op)


def _most_common(values: Iterable[str]) -> str:
    counts = Counter(v for v in values if v)
    return counts.most_common(1)[0][0] if counts else ""


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
            waiting = [view for view in ranks if view.rank in ahead]
            entered = _ops_at(waiting, name).get(front, {})
            # The waiting ranks' own record of the collective; the most common
            # op and site, should they not all agree.
            op = _most_common(e.op for e in entered.values())
            site = _most_common(e.site for e in entered.values())
            waits.append(Wait(name, desc, front, ahead, behind, op=op, site=site))
    return waits


@dataclass(frozen=True)
class Mismatch:
    """A rank that enqueued another op than most of its group at one sequence number."""

    rank: int
    group: str
    seq: int
    op: str
    others: list[int]
    others_op: str
    others_site: str


def op_mismatches(ranks: list[RankView]) -> list[Mismatch]:
    """Per rank, the first sequence number where its op differs from its group's majority."""
    groups = sorted({name for view in ranks for name in view.recent})
    found: dict[int, Mismatch] = {}
    for name in groups:
        for seq, entries in sorted(_ops_at(ranks, name).items()):
            majority = _majority(entries)
            if majority is None:
                continue
            op, agreeing = majority
            site = next((entries[r].site for r in agreeing if entries[r].site), "")
            for rank, entry in sorted(entries.items()):
                if entry.op != op and rank not in found:
                    found[rank] = Mismatch(rank, name, seq, entry.op, agreeing, op, site)
    return [found[rank] for rank in sorted(found)]


def _desc_of(view: RankView, group: str) -> str:
    return str(view.collectives.get(group, {}).get("desc", ""))


def decide(ranks: list[RankView]) -> Verdict:
    """Name the culprits among ``ranks`` from the strongest evidence that singles some out."""
    by_rank = {view.rank: view for view in ranks}
    waits = collective_waits(ranks)
    culprits: dict[int, Culprit] = {}
    for wait in waits:
        for rank in wait.missing:
            if rank in culprits:
                continue
            last = by_rank[rank].collectives[wait.group]["enqueued"]
            reason = (
                f"has not entered {wait.collective()}, where ranks "
                f"{rank_list(wait.waiting)} wait; its last is #{last}"
            )
            culprits[rank] = Culprit(rank, by_rank[rank].node, reason, Evidence.COLLECTIVE)
    for mismatch in op_mismatches(ranks):
        if mismatch.rank in culprits:
            continue
        view = by_rank[mismatch.rank]
        desc = _desc_of(view, mismatch.group)
        others = describe_collective(
            mismatch.others_op, mismatch.seq, mismatch.group, desc, mismatch.others_site
        )
        reason = (
            f"enqueued {mismatch.op} at the sequence number of {others}, "
            f"which ranks {rank_list(mismatch.others)} enqueued"
        )
        culprits[mismatch.rank] = Culprit(mismatch.rank, view.node, reason, Evidence.COLLECTIVE)
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
