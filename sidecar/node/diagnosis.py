"""The verdict of an incident: which ranks are the culprits, and why.

Pure functions over what the sidecar already knows of each rank, so that the
same verdict comes from a node's workers or from a whole job's. The evidence
is weighed in a fixed order, and the first kind that singles ranks out decides:

1. collective progress: in some process group, the ranks whose last enqueued
   collective is behind the others' (the others wait in one it never joined),
   or that enqueued another op than the others at the same sequence number;
2. exit and connection state: a rank that exited with an error or vanished;
3. heartbeats: a rank whose heartbeats stopped while its connection stayed open;
4. stacks, in a stall: the few ranks whose main-thread stack is not the one
   that most ranks (two thirds or more) share.

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
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, TypeGuard

from sidecar.schema import WorkerState


class Evidence(StrEnum):
    """What named a culprit, strongest first."""

    COLLECTIVE = "collective"
    EXIT = "exit"
    HEARTBEAT = "heartbeat"
    STACK = "stack"
    # A straggler's: it arrives late at its collectives (sidecar/node/stragglers.py).
    LAG = "lag"


# Bounds of a rank's newest ops, as a worker or another sidecar sends them.
MAX_RECENT_GROUPS = 64
MAX_RECENT_ENTRIES = 64
MAX_RECENT_TEXT = 300


@dataclass(frozen=True)
class Enqueued:
    """One collective a rank enqueued, from its flight recorder at incident time."""

    seq: int
    op: str
    # Where the program called it, ``train.py:41``; "" when unknown.
    site: str = ""
    p2p: bool = False

    @classmethod
    def from_json(cls, data: Any) -> Enqueued:
        """An entry as ``fr_recent`` answers it (other fields ignored); ValueError if not one."""
        if not isinstance(data, Mapping):
            raise ValueError("every entry must be an object")
        seq, p2p = data.get("seq"), data.get("p2p", False)
        if not is_int(seq) or not -1 <= seq < 2**63:
            raise ValueError("'seq' must be an integer of -1 or more")
        if not isinstance(p2p, bool):
            raise ValueError("'p2p' must be true or false")
        texts = {key: data.get(key, "") for key in ("op", "site")}
        for key, value in texts.items():
            if not isinstance(value, str) or len(value) > MAX_RECENT_TEXT:
                raise ValueError(
                    f"{key!r} must be a string of at most {MAX_RECENT_TEXT} characters"
                )
        return cls(seq, texts["op"], texts["site"], p2p)


def recent_from_json(groups: Any) -> dict[str, list[Enqueued]]:
    """``{group: [entry, ...]}``, each entry as :meth:`Enqueued.from_json`; ValueError if not."""
    if not isinstance(groups, Mapping) or len(groups) > MAX_RECENT_GROUPS:
        raise ValueError(f"must be an object of at most {MAX_RECENT_GROUPS} groups")
    parsed: dict[str, list[Enqueued]] = {}
    for name, entries in groups.items():
        if len(name) > 256 or not isinstance(entries, list) or len(entries) > MAX_RECENT_ENTRIES:
            most = MAX_RECENT_ENTRIES
            raise ValueError(f"group {name[:64]!r} must be a list of at most {most} entries")
        try:
            parsed[str(name)] = [Enqueued.from_json(entry) for entry in entries]
        except ValueError as exc:
            raise ValueError(f"group {name!r}: {exc}") from None
    return parsed


def positions(collectives: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """A rank's positions by group without the groups' rank lists: listed once per
    rank, a 1,000-rank group's list would make a job's incident grow with the square."""
    return {name: {k: v for k, v in p.items() if k != "ranks"} for name, p in collectives.items()}


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
    # Per process group name, its newest collectives, when the rank answered.
    recent: dict[str, list[Enqueued]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "collectives": positions(self.collectives)}

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
        try:
            recent = recent_from_json(data.get("recent", {}))
        except ValueError as exc:
            raise ValueError(f"rank {rank}: recent {exc}") from None
        return cls(
            rank=data["rank"],
            node=node,
            collectives={str(k): dict(v) for k, v in collectives.items()},
            state=WorkerState(str(data.get("state"))),
            exit=None if exit_info is None else dict(exit_info),
            heartbeat_stopped=stopped,
            ended_at=ended,
            recent=recent,
        )


def is_int(value: Any) -> TypeGuard[int]:
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
    # The op (``all_reduce``) and the call site of the waiting ranks, "" when unknown.
    op: str = ""
    site: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def collective(self) -> str:
        """``all_reduce #37 of group 0 (default_pg) called at train.py:41``."""
        return describe_collective(self.op, self.seq, self.group, self.desc, self.site)

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
        op, site = data.get("op", ""), data.get("site", "")
        if not isinstance(op, str) or not isinstance(site, str):
            raise ValueError("a wait's op and site are text")
        op, site = op[:MAX_RECENT_TEXT], site[:MAX_RECENT_TEXT]
        return cls(group, desc, seq, list(waiting), list(missing), op, site)  # type: ignore[arg-type]


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


def decide(ranks: list[RankView], groups: Sequence[Mapping[str, Any]] = ()) -> Verdict:
    """Name the culprits among ``ranks`` from the strongest evidence that singles some out.

    ``groups`` (stack groups, largest first, as ``sidecar/node/stacks.py``
    makes them) are the last evidence; pass them only when every rank has
    stopped (a stall), since a running job's ranks are at many places at once.
    """
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
    if not culprits:
        culprits = stack_outliers(by_rank, groups)
    named = sorted(culprits.values(), key=lambda c: c.rank)
    return Verdict(named, waits, summarize(named, len(ranks)))


# The dominant stack group must hold this share of the ranks with a stack.
DOMINANT_SHARE = 2 / 3


def stack_outliers(
    by_rank: Mapping[int, RankView], groups: Sequence[Mapping[str, Any]]
) -> dict[int, Culprit]:
    """The ranks outside the stack group that most ranks share, if most do."""
    if not groups:
        return {}
    stacked = sum(len(g["ranks"]) for g in groups)
    dominant = groups[0]
    if stacked < 3 or len(dominant["ranks"]) < DOMINANT_SHARE * stacked:
        return {}
    culprits: dict[int, Culprit] = {}
    for group in groups[1:]:
        for rank in group["ranks"]:
            if rank in by_rank:
                reason = (
                    f"is at {group['label']} while ranks {dominant['ranks_text']} are at "
                    f"{dominant['label']}"
                )
                culprits[rank] = Culprit(rank, by_rank[rank].node, reason, Evidence.STACK)
    return culprits


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
