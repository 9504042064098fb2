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

At an incident the sidecar also asks for the recorder's entries: the whole
recorder in the pickle ``torchfrtrace`` reads, with the group table rebuilt
(:func:`recorder_dump`), and the newest entries of each group, with the
program's own call site (:func:`recent_collectives`). The first dump with
stack traces starts torch's symbolizer, which takes seconds, so it is started
once, off the training thread, as soon as ``torch.distributed`` is initialised
(:func:`warm_symbolizer`).

Nothing here imports torch: a worker that has not imported torch, or has not
initialised ``torch.distributed``, reports no collectives.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import sys
import sysconfig
import threading
import time
from typing import Any, TypedDict

from .progress import PROGRESS

log = logging.getLogger("rankside.worker")


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
        if not _warmup_started and PROGRESS.steps >= WARMUP_AFTER_STEPS:
            start_symbolizer_warmup()
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


# -- the recorder's entries, at incident time ----------------------------------------


class RecorderUnavailable(Exception):
    """This worker has no flight recorder to read: torch.distributed is not initialised."""


def _c10d_or_raise() -> tuple[Any, Any]:
    dist = _distributed()
    if dist is None:
        raise RecorderUnavailable(
            "torch.distributed is not initialised in this worker: it has no flight recorder"
        )
    return dist, importlib.import_module("torch._C._distributed_c10d")


def _read_recorder(stack_traces: bool, only_active: bool = False) -> tuple[Any, dict[str, Any]]:
    """torch's recorder, unpickled; without stack traces while the symbolizer warms up.

    A dump with stack traces waits for the warm-up (seconds): an incident's
    dump is better fast without the frames than late or not at all.
    ``rankside_stack_traces`` says which it is.
    """
    dist, c10d_c = _c10d_or_raise()
    stack_traces = stack_traces and stacks_ready()
    # torch's own pickle, made by this very process a moment ago: the one place
    # rankside unpickles anything, and never on the sidecar.
    dump = pickle.loads(c10d_c._dump_fr_trace(True, stack_traces, only_active))
    if not isinstance(dump, dict):
        raise RecorderUnavailable(f"torch's recorder dump is a {type(dump).__name__}, not a dict")
    dump["rankside_stack_traces"] = stack_traces
    return dist, dump


def patch_group_table(dump: dict[str, Any], table: dict[str, tuple[str, list[int]]]) -> None:
    """Give ``dump`` the ``pg_config`` torchfrtrace needs, rebuilt from ``table``.

    gloo writes one group ``''`` with no ranks; torchfrtrace looks every
    entry's group up by name in ``pg_config`` (its ``desc`` and ``ranks``, the
    latter as the text ``"[0, 1]"``). A group the backend filled in itself
    (NCCL) keeps torch's row. Entries of a group that is in neither (destroyed
    since) are left out, since torchfrtrace stops at the first it cannot place;
    ``rankside_dropped_entries`` counts them.
    """
    config: dict[str, dict[str, str]] = {
        name: {"name": name, "desc": desc, "ranks": str(ranks)}
        for name, (desc, ranks) in table.items()
    }
    for name, row in dict(dump.get("pg_config") or {}).items():
        if name and isinstance(row, dict) and row.get("ranks") not in (None, "", "[]"):
            config[name] = row
    dump["pg_config"] = config
    entries = list(dump.get("entries") or [])
    kept = [e for e in entries if _entry_group(e) in config]
    if len(kept) != len(entries):
        dump["rankside_dropped_entries"] = len(entries) - len(kept)
    dump["entries"] = kept


def _entry_group(entry: dict[str, Any]) -> str:
    group = entry.get("process_group") or ("",)
    return str(group[0])


def recorder_dump(stack_traces: bool = True, only_active: bool = False) -> bytes:
    """The whole flight recorder, as the pickle torchfrtrace reads, with the group table rebuilt."""
    dist, dump = _read_recorder(stack_traces, only_active)
    patch_group_table(dump, group_table(dist))
    return pickle.dumps(dump, protocol=pickle.HIGHEST_PROTOCOL)


# At most this many entries per group in the compact answer.
MAX_RECENT = 64
_RANKSIDE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class Machinery:
    """Where frames that are not the program's own live: torch, rankside, the stdlib."""

    def __init__(self) -> None:
        never = [_RANKSIDE_DIR]
        torch_file = getattr(sys.modules.get("torch"), "__file__", None)
        if torch_file:
            never.append(os.path.dirname(os.path.abspath(torch_file)) + os.sep)
        self.never = tuple(never)
        stdlib = sysconfig.get_paths().get("stdlib")
        self.stdlib = os.path.abspath(stdlib) + os.sep if stdlib else None

    def owns(self, filename: str) -> bool:
        """Whether a frame of ``filename`` is torch's, rankside's or the stdlib's."""
        if filename.startswith(self.never):
            return True
        # A system Python installs packages under the stdlib's directory.
        in_stdlib = self.stdlib is not None and filename.startswith(self.stdlib)
        return in_stdlib and f"-packages{os.sep}" not in filename


def call_site(frames: list[dict[str, Any]], machinery: Machinery) -> tuple[str, str]:
    """``("train.py:41", "main")``: the innermost frame of the program's own code.

    Frames are innermost first, as the recorder keeps them; ``("", "")`` when
    none is the program's (or the recorder kept no frames).
    """
    for frame in frames:
        filename = str(frame.get("filename", ""))
        if not filename or filename.startswith("<frozen") or machinery.owns(filename):
            continue
        return f"{os.path.basename(filename)}:{frame.get('line', '?')}", str(frame.get("name", ""))
    return "", ""


def recent_collectives(per_group: int = 8) -> dict[str, Any]:
    """Per process group, its newest recorder entries (newest first), as compact JSON.

    Each entry: ``seq`` (``collective_seq_id``, or ``p2p_seq_id`` for a send or
    recv), ``p2p``, ``op`` (``all_reduce``) and ``profiling_name``
    (``gloo:all_reduce``), ``state``, ``time_created_ns``, and ``site`` and
    ``function``: where the program called it (``train.py:41``), "" when the
    recorder kept no frames. ``stack_traces`` is false while the symbolizer
    warms up, when no entry has a site.
    """
    dist, dump = _read_recorder(stack_traces=True)
    table = group_table(dist)
    machinery = Machinery()
    groups: dict[str, dict[str, Any]] = {}
    # torch lists entries oldest first, by record id.
    for entry in reversed(list(dump.get("entries") or [])):
        name = _entry_group(entry)
        group = groups.get(name)
        if group is None:
            if len(groups) >= MAX_GROUPS:
                continue
            desc, ranks = table.get(name, (str((entry.get("process_group") or ("", ""))[-1]), []))
            group = groups[name] = {
                "desc": desc[:200],
                "ranks": ranks if len(ranks) <= MAX_LISTED_RANKS else [],
                "entries": [],
            }
        if len(group["entries"]) >= per_group:
            continue
        p2p = bool(entry.get("is_p2p"))
        profiling_name = str(entry.get("profiling_name", ""))[:200]
        site, function = call_site(list(entry.get("frames") or []), machinery)
        group["entries"].append(
            {
                "seq": int(entry.get("p2p_seq_id" if p2p else "collective_seq_id", -1)),
                "p2p": p2p,
                "op": profiling_name.split(":", 1)[-1],
                "profiling_name": profiling_name,
                "state": str(entry.get("state", ""))[:40],
                "time_created_ns": int(entry.get("time_created_ns") or 0),
                "site": site[:300],
                "function": function[:200],
            }
        )
    return {"stack_traces": bool(dump["rankside_stack_traces"]), "groups": groups}


# -- the symbolizer, started before anyone needs it ---------------------------------

_warmup_lock = threading.Lock()
_warmup_started = False
_warmup_running = threading.Event()
# Seconds the warm-up took, once it ran (tests and the bench read it).
warmup_seconds: float | None = None


def warming_up() -> bool:
    """Whether the symbolizer's warm-up is running now."""
    return _warmup_running.is_set()


# RANKSIDE_FR_WARMUP=0 leaves the first dump with stacks to pay for it instead.
WARMUP_ENV = "RANKSIDE_FR_WARMUP"
# The warm-up imports torch._inductor (some 800 modules) on a thread of its own.
# Begun while the training thread still imports (DDP's constructor imports
# torch._dynamo, which imports torch._inductor too), the two imports met half
# way and DDP failed with "cannot import name 'IndentedBuffer' from
# 'torch._inductor.utils'" (tests/test_torchrun_e2e.py, four ranks on 2 cores).
# So it waits for training to be under way: this many step() calls.
WARMUP_AFTER_STEPS = 10


def warmup_disabled() -> bool:
    return os.environ.get(WARMUP_ENV, "1").strip().lower() in ("0", "false", "no", "off")


def stacks_ready() -> bool:
    """Whether a dump may ask torch for stack traces now.

    Once the warm-up is done (or turned off: the first dump then pays for the
    symbolizer itself). Before, a dump with stacks would import torch._inductor
    on a handler thread, as the warm-up would, while training may import too.
    """
    return warmup_seconds is not None or warmup_disabled()


def warm_symbolizer() -> float:
    """Symbolize one Python traceback, so that the recorder's first dump with stacks is fast.

    The first traceback torch symbolizes takes 1-6 s, and the flight
    recorder's dump with stack traces is one: in torch 2.13 it imports
    ``torch._inductor`` (some 800 modules, sympy among them) on first use.
    Returns the seconds it took.
    """
    profiler = importlib.import_module("torch._C._profiler")
    started = time.perf_counter()
    profiler.symbolize_tracebacks([profiler.gather_traceback(True, True, False)])
    return time.perf_counter() - started


def _warm() -> None:
    global warmup_seconds
    try:
        warmup_seconds = warm_symbolizer()
    except Exception as exc:  # an optional speed-up; never fatal
        log.debug("rankside: could not warm torch's symbolizer: %s", exc)
    finally:
        _warmup_running.clear()


def start_symbolizer_warmup() -> None:
    """Warm the symbolizer once, on a thread of its own, unless RANKSIDE_FR_WARMUP=0.

    Neither the training thread nor the connection thread waits for it, so no
    heartbeat is held up for the seconds it takes; imports hold the GIL much of
    that time, so the training thread runs slower meanwhile, once.
    """
    global _warmup_started
    with _warmup_lock:
        if _warmup_started:
            return
        _warmup_started = True
    if warmup_disabled():
        return
    _warmup_running.set()
    threading.Thread(target=_warm, name="rankside-symbolizer", daemon=True).start()
