"""Where this rank is in its collectives, read from torch's flight recorder.

When a job hangs, every rank stops; the rank that never arrived is the one
whose collective sequence number in a process group is behind the others'.
torch's flight recorder (on by default in torch 2.13, ``TORCH_FR_BUFFER_SIZE``)
keeps, per process group, the sequence number of the last collective enqueued,
started and completed. Its status-only dump (``_dump_fr_trace_json(False,
False)``) costs microseconds, so the connection thread reads it for every
heartbeat: the sidecar then knows each rank's position even after the rank
stops answering, since its last heartbeat is the evidence.

What each backend fills in (torch 2.13): NCCL marks entries enqueued, started
and completed; gloo marks them enqueued and completed, never started (``-1``),
and names every group ``''`` in its ``pg_config``, so the group table (name,
description, global ranks) is rebuilt here from ``torch.distributed`` itself.

Stragglers need more: when each rank *arrived* at each collective. The
recorder's entries have it (``time_created_ns``, per ``collective_seq_id``),
but reading them is the full dump, tens of milliseconds with the GIL held for
part of it (bench/bench_collectives.py). So ``arrivals`` reads it rarely
(every ``RANKSIDE_LAG_INTERVAL`` seconds, 30 by default, on the connection
thread) and sends only the entries that are new since the last read.

Nothing here imports torch: a worker that has not imported torch, or has not
initialised ``torch.distributed``, reports no collectives.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any, TypedDict


class GroupProgress(TypedDict):
    """One process group's position, as the heartbeat carries it."""

    desc: str
    ranks: list[int]
    enqueued: int
    started: int
    completed: int


# A heartbeat carries at most this many groups: a program that makes a group
# per step must not make every heartbeat grow without bound.
MAX_GROUPS = 64
# A group of more ranks is sent with its size only (the sidecar knows the job's
# ranks); a 4,096-rank list in every heartbeat would cost more than it tells.
MAX_LISTED_RANKS = 1024
# Arrivals sent per group per read: the newest, when more are new.
MAX_ARRIVALS = 256


def _distributed() -> Any:
    """``torch.distributed`` when it is imported and initialised, else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return None
    try:
        if not dist.is_available() or not dist.is_initialized():
            return None
    except Exception:
        return None
    return dist


def group_table(dist: Any) -> dict[str, tuple[str, list[int]]]:
    """Each process group's name, with its description and global ranks."""
    c10d = dist.distributed_c10d
    table: dict[str, tuple[str, list[int]]] = {}
    for group, name in list(c10d._world.pg_names.items()):
        try:
            ranks = list(dist.get_process_group_ranks(group))
        except Exception:
            # Groups this rank is not a member of have no ranks to give.
            continue
        table[str(name)] = (str(getattr(group, "group_desc", "") or ""), ranks)
    return table


class CollectiveProgress:
    """Reads the flight recorder's status for heartbeats; caches the group table."""

    def __init__(self) -> None:
        self._groups: dict[str, tuple[str, list[int]]] = {}
        self._group_count = -1
        self._failed = False
        self._arrivals_failed = False
        # Per group, the newest sequence number already sent as an arrival.
        self._sent: dict[str, int] = {}

    def arrivals(self) -> dict[str, list[list[int]]] | None:
        """Per group, ``[seq, time_created_ns]`` of the collectives enqueued since the
        last call (at most MAX_ARRIVALS each), or None when there is nothing to say."""
        if self._arrivals_failed:
            return None
        dist = _distributed()
        if dist is None:
            return None
        try:
            c10d_c = importlib.import_module("torch._C._distributed_c10d")
            # The JSON form, entries without their stack traces.
            entries = json.loads(c10d_c._dump_fr_trace_json(True, False)).get("entries", [])
            return self._new_arrivals(entries)
        except Exception:
            self._arrivals_failed = True
            return None

    def _new_arrivals(self, entries: list[dict[str, Any]]) -> dict[str, list[list[int]]] | None:
        fresh: dict[str, list[list[int]]] = {}
        for entry in entries:
            if entry.get("is_p2p"):
                continue
            group = entry.get("process_group") or ["", ""]
            name = str(group[0])
            seq, created = entry.get("collective_seq_id"), entry.get("time_created_ns")
            if not isinstance(seq, int) or not isinstance(created, int):
                continue
            if seq > self._sent.get(name, -1):
                fresh.setdefault(name, []).append([seq, created])
        if not fresh:
            return None
        sent: dict[str, list[list[int]]] = {}
        for name, pairs in list(fresh.items())[:MAX_GROUPS]:
            pairs.sort()
            sent[name] = pairs[-MAX_ARRIVALS:]
            self._sent[name] = pairs[-1][0]
        return sent

    def read(self) -> dict[str, GroupProgress] | None:
        """Every group's position, or None when there is nothing to report."""
        if self._failed:
            return None
        dist = _distributed()
        if dist is None:
            return None
        try:
            return self._read(dist)
        except Exception:
            # An API that changed under us: report nothing rather than fail a
            # heartbeat, and do not pay for the failure once a second.
            self._failed = True
            return None

    def _read(self, dist: Any) -> dict[str, GroupProgress]:
        # Through importlib: the private binding is not in torch's type stubs.
        c10d_c = importlib.import_module("torch._C._distributed_c10d")

        # Groups are made rarely and never unmade while training: rebuild the
        # table only when their number changes.
        count = len(dist.distributed_c10d._world.pg_names)
        if count != self._group_count:
            self._groups = group_table(dist)
            self._group_count = count
        status = json.loads(c10d_c._dump_fr_trace_json(False, False)).get("pg_status", {})
        progress: dict[str, GroupProgress] = {}
        for name, position in list(status.items())[:MAX_GROUPS]:
            desc, ranks = self._groups.get(name, ("", []))
            progress[name] = {
                "desc": desc[:200],
                "ranks": ranks if len(ranks) <= MAX_LISTED_RANKS else [],
                "enqueued": int(position.get("last_enqueued_collective", -1)),
                "started": int(position.get("last_started_collective", -1)),
                "completed": int(position.get("last_completed_collective", -1)),
            }
        return progress
