"""Grouping ranks by their main thread's stack.

At a hang, 63 ranks show one stack (waiting in an all_reduce) and one rank
another: grouping the ranks by stack turns hundreds of dumps into a few
lines, ``0-62: all_reduce at train.py:41`` and ``63: get at data.py:88``.
Stacks come from faulthandler (the ``dump_traceback`` handler) or from py-spy
(for a rank that cannot answer); only the main thread counts, so rankside's
own threads and a data loader's never split a group.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.node.diagnosis import rank_list

# faulthandler: '  File "/path/train.py", line 41 in main'
_FAULTHANDLER_FRAME = re.compile(r'^\s+File "(?P<file>.*)", line (?P<line>\d+) in (?P<func>.+)\Z')
# py-spy: '    main (train.py:41)', with "Thread 0x... (active): "MainThread"" above
_PYSPY_FRAME = re.compile(r"^\s+(?P<func>\S.*) \((?P<file>.+):(?P<line>\d+)\)\Z")
_THREAD = re.compile(r"^(Thread|Current thread) ")
# Frames of these files are the machinery, not the place a person looks.
_LIBRARY = ("/site-packages/", "/dist-packages/", "/lib/python3")


@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    func: str

    def where(self) -> str:
        return f"{self.file.rsplit('/', 1)[-1]}:{self.line}"


def _threads(text: str) -> list[tuple[str, list[Frame]]]:
    threads: list[tuple[str, list[Frame]]] = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if _THREAD.match(line):
            threads.append((line, []))
            continue
        match = _FAULTHANDLER_FRAME.match(line) or _PYSPY_FRAME.match(line)
        if match and threads:
            threads[-1][1].append(Frame(match["file"], int(match["line"]), match["func"]))
    return threads


def main_thread_stack(text: str) -> list[Frame] | None:
    """The main thread's frames, innermost first, from a faulthandler or py-spy dump."""
    threads = [(head, frames) for head, frames in _threads(text) if frames]
    for head, frames in threads:
        if '"MainThread"' in head:
            return frames
    # faulthandler names no thread: the main one is the one not started by threading.
    for _, frames in threads:
        if not frames[-1].file.endswith("threading.py"):
            return frames
    return None


def describe(frames: list[Frame]) -> str:
    """``all_reduce at train.py:41``: the innermost call, at the innermost line of user code."""
    user = next((f for f in frames if not any(p in f.file for p in _LIBRARY)), frames[0])
    return f"{frames[0].func} at {user.where()}"


StackKey = tuple[tuple[str, int, str], ...]


def group_stacks(stacks: Mapping[int, str]) -> list[dict[str, Any]]:
    """Ranks with the same main-thread stack, largest group first.

    Each group: ``ranks`` (ints), ``ranks_text`` (``"0-62"``), ``label`` and
    ``frames`` (innermost first). Ranks whose dump has no readable main
    thread form a group of their own with no frames.
    """
    groups: dict[StackKey, list[int]] = {}
    frames_of: dict[StackKey, list[Frame]] = {}
    for rank, text in stacks.items():
        frames = main_thread_stack(text) or []
        key = tuple((f.file, f.line, f.func) for f in frames)
        groups.setdefault(key, []).append(rank)
        frames_of[key] = frames
    return _shaped(groups, frames_of)


def merge_groups(node_groups: Iterable[Any]) -> list[dict[str, Any]]:
    """Several nodes' stack groups as one job's: groups with the same frames are one.

    ``node_groups`` are groups as ``group_stacks`` shapes them, from other
    sidecars too: one that is malformed is left out rather than trusted.
    """
    groups: dict[StackKey, list[int]] = {}
    frames_of: dict[StackKey, list[Frame]] = {}
    for group in node_groups:
        try:
            frames = [
                Frame(str(f["file"]), int(f["line"]), str(f["func"])) for f in group["frames"]
            ]
            ranks = [r for r in group["ranks"] if isinstance(r, int) and not isinstance(r, bool)]
        except (TypeError, KeyError, ValueError):
            continue
        key = tuple((f.file, f.line, f.func) for f in frames)
        groups.setdefault(key, []).extend(ranks)
        frames_of[key] = frames
    return _shaped(groups, frames_of)


def _shaped(
    groups: Mapping[StackKey, list[int]], frames_of: Mapping[StackKey, list[Frame]]
) -> list[dict[str, Any]]:
    ordered = sorted(
        ((k, sorted(set(r))) for k, r in groups.items() if r),
        key=lambda kv: (-len(kv[1]), kv[1][0]),
    )
    return [
        {
            "ranks": ranks,
            "ranks_text": rank_list(ranks),
            "label": describe(frames_of[key]) if key else "no readable main-thread stack",
            "frames": [{"file": f.file, "line": f.line, "func": f.func} for f in frames_of[key]],
        }
        for key, ranks in ordered
    ]
