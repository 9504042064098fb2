"""The verdict's last evidence and its job-wide merge, as pure functions.

The end-to-end tests (test_collectives, test_job_diagnosis, test_stalls) reach
every other kind of evidence with real processes; a hang that leaves the
collective positions, exits and heartbeats all equal (ranks stuck in
something the flight recorder does not see) is put together here from rank
views and stack groups as the sidecar builds them.
"""

from __future__ import annotations

from sidecar.node.diagnosis import RankView
from sidecar.node.incidents import IncidentKind, verdict_of
from sidecar.node.stacks import group_stacks, merge_groups
from sidecar.schema import WorkerState

WAITING = """Thread 0x00007f (most recent call first):
  File "/srv/train.py", line 41 in wait_for_peers
  File "/srv/train.py", line 90 in main
"""
STUCK = """Thread 0x00007f (most recent call first):
  File "/usr/lib/python3.11/queue.py", line 171 in get
  File "/srv/data.py", line 88 in next_batch
  File "/srv/train.py", line 90 in main
"""


def views(count: int) -> list[RankView]:
    return [
        RankView(r, "node-a" if r < 2 else "node-b", {}, WorkerState.RUNNING) for r in range(count)
    ]


def test_in_a_stall_the_rank_whose_stack_differs_from_most_is_named() -> None:
    groups = group_stacks({0: WAITING, 1: WAITING, 2: WAITING, 3: STUCK})
    verdict = verdict_of(IncidentKind.STALL, views(4), groups)
    assert [(c.rank, c.evidence) for c in verdict.culprits] == [(3, "stack")]
    assert "is at get at data.py:88 while ranks 0-2 are at wait_for_peers at train.py:41" in (
        verdict.summary
    )
    # A manual look at a running job names nobody from stacks: ranks are everywhere.
    assert verdict_of(IncidentKind.MANUAL, views(4), groups).culprits == []
    # Without a clear majority, nobody either.
    even = group_stacks({0: WAITING, 1: WAITING, 2: STUCK, 3: STUCK})
    assert verdict_of(IncidentKind.STALL, views(4), even).culprits == []


def test_nodes_stack_groups_merge_by_frames() -> None:
    node_a = group_stacks({0: WAITING, 1: WAITING})
    node_b = group_stacks({2: WAITING, 3: STUCK})
    merged = merge_groups([*node_a, *node_b, {"ranks": "junk"}])
    assert [(g["ranks_text"], g["label"]) for g in merged] == [
        ("0-2", "wait_for_peers at train.py:41"),
        ("3", "get at data.py:88"),
    ]
