"""``rankside top``: a terminal view of the workers that redraws itself.

Plain ANSI rather than curses: the frame is the same text ``rankside
workers`` prints, drawn over the previous one on a terminal and printed one
after the other when the output is a pipe (tests, ``watch``-like logging).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from typing import TextIO

from sidecar.cli import tables as present
from sidecar.client.job import JobWorkers

ALT_SCREEN_ON = "\x1b[?1049h\x1b[?25l"
ALT_SCREEN_OFF = "\x1b[?25h\x1b[?1049l"
HOME = "\x1b[H"
CLEAR_LINE_END = "\x1b[K"
CLEAR_BELOW = "\x1b[J"


def frame(
    view: JobWorkers, where: str, job: bool, interval: float, color: bool, waits: bool = True
) -> list[str]:
    """One screen: a title, what is wrong, and the workers with the broken ones first.

    ``waits``: keys are read after this frame, so it says how to quit.
    """
    title = f"rankside top  {where}  {present.format_clock(view.time)}  every {interval:g} s"
    lines = [present.BOLD + title + present.RESET if color else title]
    lines.append(present.summary_line(view, job))
    problems = [
        f"  rank {present.rank_label(w)} {c.label.lower()}: {' '.join((c.detail or '').split())}"
        for w in view.workers
        if (c := present.condition(w)).bad
    ]
    if color:
        problems = [present.RED + p + present.RESET for p in problems]
    lines += problems
    lines.append("")
    lines += present.worker_lines(view, job, by_severity=True, color=color)
    if not view.workers:
        lines.append("(no workers)")
    lines += present.unreachable_lines(view.nodes, color)
    if waits:
        lines += ["", "q or Ctrl-C quits"]
    return lines


def fit_height(lines: list[str], height: int) -> list[str]:
    """At most ``height`` lines; when some are cut, the last one says how many."""
    if len(lines) <= height:
        return lines
    keep = max(height - 1, 0)
    hidden = len(lines) - keep
    return [*lines[:keep], f"... {hidden} more lines not shown: enlarge the terminal"]


@contextlib.contextmanager
def keys_from(stream: TextIO) -> Iterator[Callable[[float], str | None]]:
    """A function that waits up to N seconds for one key press (cbreak mode meanwhile)."""
    if not stream.isatty():

        def sleep(seconds: float) -> str | None:
            time.sleep(seconds)
            return None

        yield sleep
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:

        def read_key(seconds: float) -> str | None:
            ready, _, _ = select.select([fd], [], [], seconds)
            return os.read(fd, 1).decode(errors="replace") if ready else None

        yield read_key
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run(
    fetch: Callable[[], JobWorkers],
    where: str,
    job: bool,
    interval: float,
    iterations: int | None,
    as_json: bool,
    out: TextIO = sys.stdout,
) -> JobWorkers | None:
    """Redraw every ``interval`` s until q, Ctrl-C or ``iterations`` frames; the last view."""
    terminal = out.isatty() and not as_json
    color = terminal and not os.environ.get("NO_COLOR")
    view: JobWorkers | None = None
    shown = 0
    if terminal:
        out.write(ALT_SCREEN_ON)
    try:
        with keys_from(sys.stdin) as wait_key:
            while True:
                view = fetch()
                if as_json:
                    out.write(json.dumps(view.to_json()) + "\n")
                elif terminal:
                    size = shutil.get_terminal_size()
                    waits = iterations is None or shown + 1 < iterations
                    lines = fit_height(
                        frame(view, where, job, interval, color, waits), size.lines - 1
                    )
                    # Cut long lines at the edge: a wrapped line would scroll the screen.
                    body = "".join(
                        _fit(line, size.columns) + CLEAR_LINE_END + "\n" for line in lines
                    )
                    out.write(HOME + body + CLEAR_BELOW)
                else:
                    waits = iterations is None or shown + 1 < iterations
                    text = "\n".join(frame(view, where, job, interval, False, waits))
                    out.write(text + "\n\n")
                out.flush()
                shown += 1
                if iterations is not None and shown >= iterations:
                    break
                if (wait_key(interval) or "").lower() == "q":
                    break
    except KeyboardInterrupt:
        pass
    finally:
        if terminal:
            out.write(ALT_SCREEN_OFF)
            out.flush()
    return view


def _fit(line: str, columns: int) -> str:
    """``line`` cut to ``columns`` visible characters, keeping its colour codes intact."""
    visible = 0
    out: list[str] = []
    i = 0
    while i < len(line):
        if line[i] == "\x1b":
            end = line.find("m", i)
            if end != -1:
                out.append(line[i : end + 1])
                i = end + 1
                continue
        if visible >= columns:
            break
        out.append(line[i])
        visible += 1
        i += 1
    text = "".join(out)
    return text + present.RESET if "\x1b[" in text else text
