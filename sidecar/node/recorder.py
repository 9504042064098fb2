"""The flight recorder at incident time: each rank's dump kept for torchfrtrace, its newest ops.

Two calls to every rank that reports collective progress (so
``torch.distributed`` is initialised there) and has the handlers:

- ``fr_trace_dump``: the whole recorder, as the pickle torchfrtrace reads, with
  the group table rebuilt by the worker. The sidecar stores these bytes as they
  came, one file per rank in the incident's own directory
  (``sidecar/node/dumps.py``); it never unpickles anything.
- ``fr_recent``: compact JSON of each group's newest collectives (sequence
  number, op, call site), which the verdict reads: the op and the call site of
  the collective the others wait in, and ranks that enqueued another op at the
  same sequence number. It is validated here; a malformed answer is left out of
  the verdict, with an event that says why.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from sidecar.metrics import own
from sidecar.node.diagnosis import MAX_RECENT_GROUPS, Enqueued, recent_from_json
from sidecar.node.dumps import DumpStore
from sidecar.node.events import EventKind, EventLog
from sidecar.node.fanout import Caller, fan_out
from sidecar.node.workers import Worker
from sidecar.schema import Reply

FR_DUMP = "fr_trace_dump"
FR_RECENT = "fr_recent"
# What the verdict asks for: enough to cover a few steps of a few collectives each.
RECENT_ENTRIES = 16

# Rank -> group name -> newest collectives, newest first.
Recent = dict[int, dict[str, list[Enqueued]]]
# How a failed call is kept: (incident, worker key, handler, reply).
SaveNote = Callable[[str, str, str, Reply], Awaitable[None]]


class MalformedRecent(ValueError):
    """A worker's ``fr_recent`` answer is not what the handler specifies."""


def parse_recent(body: bytes) -> dict[str, list[Enqueued]]:
    """Validate an ``fr_recent`` answer; MalformedRecent says what is wrong."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedRecent(f"not JSON: {exc}") from None
    groups = data.get("groups") if isinstance(data, dict) else None
    if not isinstance(groups, dict) or len(groups) > MAX_RECENT_GROUPS:
        raise MalformedRecent(f"'groups' must be an object of at most {MAX_RECENT_GROUPS} groups")
    entries: dict[str, Any] = {}
    for name, group in groups.items():
        entries[name] = group.get("entries") if isinstance(group, dict) else None
        if not isinstance(entries[name], list):
            raise MalformedRecent(f"group {name[:64]!r} must be an object with 'entries'")
    try:
        return recent_from_json(entries)
    except ValueError as exc:
        raise MalformedRecent(str(exc)) from None


def recorded(worker: Worker, handler: str) -> bool:
    """Whether ``worker`` can answer ``handler``: it has it, and has collectives to tell."""
    return worker.rank is not None and bool(worker.collectives) and handler in worker.handlers


async def capture(
    caller: Caller,
    workers: list[Worker],
    store: DumpStore,
    events: EventLog,
    incident: str,
    timeout: float,
    save_note: SaveNote,
) -> tuple[list[str], Recent]:
    """Save each rank's recorder dump and read its newest ops; (dump ids, ops by rank)."""
    dumping = [w for w in workers if recorded(w, FR_DUMP)]
    reading = [w for w in workers if recorded(w, FR_RECENT)]
    await asyncio.to_thread(store.clear_recorder, incident)
    params = [("entries", str(RECENT_ENTRIES))]
    # Both at once: each is one read of the recorder on a handler thread.
    dumps, answers = await asyncio.gather(
        fan_out(caller, [w.key for w in dumping], FR_DUMP, [], b"", timeout),
        fan_out(caller, [w.key for w in reading], FR_RECENT, params, b"", timeout),
    )
    saved: list[str] = []
    for worker in dumping:
        reply = dumps[worker.key]
        if not (reply.answered and reply.status == 200):
            await save_note(incident, worker.key, FR_DUMP, reply)
            continue
        assert worker.rank is not None
        try:
            dump = await asyncio.to_thread(store.save_recorder, incident, worker.rank, reply.body)
        except OSError as exc:
            events.record(
                EventKind.DUMP_FAILED,
                f"could not write the flight-recorder dump of worker {worker.key}: {exc}",
                worker.key,
                incident=incident,
            )
            continue
        own.DUMPS.inc()
        saved.append(dump.id)
    recent: Recent = {}
    for worker in reading:
        reply = answers[worker.key]
        if not (reply.answered and reply.status == 200):
            continue  # the verdict goes without this rank's ops, as without its stack
        assert worker.rank is not None
        try:
            recent[worker.rank] = parse_recent(reply.body)
        except MalformedRecent as exc:
            events.record(
                EventKind.HANDLER_FAILED,
                f"worker {worker.key} answered {FR_RECENT} with a malformed body, "
                f"left out of the verdict: {exc}",
                worker.key,
                incident=incident,
            )
    return saved, recent
