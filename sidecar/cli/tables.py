"""Workers and events as terminal text, for ``rankside workers``, ``events`` and ``top``.

Everything a worker reports (its host name, exception text, event messages)
goes through ``printable`` before it reaches a terminal: an escape sequence in
it would otherwise act on the operator's terminal. ``--json`` output is left
as received; JSON escapes control characters itself.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from sidecar.client.job import JobWorkers, NodeStatus
from sidecar.schema import WorkerJSON, WorkerState

RED = "\x1b[1;31m"
YELLOW = "\x1b[33m"
GREEN = "\x1b[32m"
DIM = "\x1b[2m"
BOLD = "\x1b[1m"
RESET = "\x1b[0m"


def printable(text: str) -> str:
    """``text`` with each character a terminal would act on (ESC, other controls,
    bidirectional overrides) written as ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


class Severity(IntEnum):
    """How bad a worker's condition is; the worst sorts first."""

    STALLED = 0
    DOWN = 1
    RUNNING = 2
    EXITED = 3


@dataclass(frozen=True)
class Condition:
    """How a worker is doing, for the eye."""

    label: str
    severity: Severity
    detail: str | None = None

    @property
    def bad(self) -> bool:
        return self.severity < Severity.RUNNING


def condition(worker: WorkerJSON) -> Condition:
    """Stalled, down (disconnected or failed), running or exited cleanly.

    The detail is on one line and printable: it quotes what the worker reported.
    """
    cond = _condition(worker)
    if cond.detail is None:
        return cond
    return Condition(cond.label, cond.severity, printable(_one_line(cond.detail)))


def _condition(worker: WorkerJSON) -> Condition:
    if worker.get("stalled"):
        return Condition("STALLED", Severity.STALLED, worker.get("stall_reason"))
    state = worker.get("state")
    if state == WorkerState.DISCONNECTED:
        return Condition("DISCONNECTED", Severity.DOWN, "connection lost")
    if state == WorkerState.EXITED:
        info = worker.get("exit") or {}
        if info.get("reason") == "exception":
            detail = f"{info.get('exc_type', 'exception')}: {info.get('exc_message', '')}"
            return Condition("FAILED", Severity.DOWN, detail)
        if info.get("exit_code"):
            return Condition("FAILED", Severity.DOWN, f"exit code {info['exit_code']}")
        return Condition("exited", Severity.EXITED)
    return Condition("running", Severity.RUNNING)


def rank_label(worker: WorkerJSON) -> str:
    rank = worker.get("rank")
    return str(rank) if isinstance(rank, int) else printable(str(worker.get("key")))


def format_bytes(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" or size >= 100 else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def format_rate(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def format_age(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = int(max(0, seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def format_clock(unix: Any) -> str:
    if not isinstance(unix, int | float):
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(unix))


def node_name(url: str) -> str:
    return url.split("://", 1)[-1]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Columns padded to their widest cell; ``right`` holds the right-aligned ones.

    Cells are made printable: most of them quote what a worker reported.
    """
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return [line(headers), *(line(row) for row in rows)]


def worker_lines(
    view: JobWorkers, job: bool, by_severity: bool = False, color: bool = False
) -> list[str]:
    """The workers table: by global rank, or with stalled and down ranks first."""
    workers = list(view.workers)
    conditions = [condition(w) for w in workers]
    order = sorted(
        range(len(workers)), key=lambda i: (conditions[i].severity if by_severity else 0, i)
    )
    headers = ["RANK", "STATE", "STEP", "STEPS/S", "PROGRESS", "RESTARTS", "MEMORY", "HOST"]
    if job:
        headers.append("NODE")
    headers.append("DETAIL")
    rows = []
    for i in order:
        w, cond = workers[i], conditions[i]
        age = w.get("progress_age") if w.get("state") == "running" else None
        row = [
            rank_label(w),
            cond.label,
            "-" if w.get("step") is None else str(w["step"]),
            format_rate(w.get("steps_per_second")),
            format_age(age),
            str(w.get("restart_count", 0)),
            format_bytes(w.get("resident_memory_bytes")),
            str(w.get("hostname", "")),
        ]
        if job:
            row.append(node_name(str(w.get("node", ""))))
        row.append(_one_line(cond.detail or ""))
        rows.append(row)
    lines = table(headers, rows, right={0, 2, 3, 4, 5, 6})
    if color:
        lines[0] = DIM + lines[0] + RESET
        for n, i in enumerate(order, start=1):
            tint = {Severity.STALLED: RED, Severity.DOWN: RED, Severity.EXITED: DIM}.get(
                conditions[i].severity
            )
            if tint:
                lines[n] = tint + lines[n] + RESET
    return lines


def _one_line(text: str) -> str:
    return " ".join(text.split())


def summary_line(view: JobWorkers, job: bool) -> str:
    """``8 workers: 6 running, 1 stalled (rank 3), 1 down (rank 5); nodes 2/3``."""
    conditions = [(condition(w), w) for w in view.workers]
    running = sum(1 for c, _ in conditions if c.severity is Severity.RUNNING)
    stalled = [rank_label(w) for c, w in conditions if c.severity is Severity.STALLED]
    down = [rank_label(w) for c, w in conditions if c.severity is Severity.DOWN]
    parts = [f"{running} running"]
    if stalled:
        parts.append(f"{len(stalled)} stalled (rank {', '.join(stalled)})")
    if down:
        parts.append(f"{len(down)} down (rank {', '.join(down)})")
    text = f"{len(view.workers)} workers: {', '.join(parts)}"
    if job:
        ok = sum(1 for n in view.nodes if n.ok)
        text += f"; nodes {ok}/{len(view.nodes)} answered"
    return text


def unreachable_lines(nodes: Sequence[NodeStatus], color: bool = False) -> list[str]:
    lines = [printable(f"UNREACHABLE {n.url}: {n.error}") for n in nodes if not n.ok]
    return [RED + line + RESET for line in lines] if color else lines


def event_line(event: dict[str, Any], job: bool) -> str:
    """``03:17:29  worker_stalled  rank 3  worker 3 stalled: ...`` (node too in a job)."""
    worker = event.get("worker")
    who = "sidecar" if worker is None else f"rank {worker}"
    if job and event.get("node"):
        who += f" @ {node_name(event['node'])}"
    kind = str(event.get("kind", ""))
    message = str(event.get("message", ""))
    return printable(f"{format_clock(event.get('time'))}  {kind:<19}  {who:<10}  {message}")
