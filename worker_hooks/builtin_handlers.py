"""The debug handlers every worker answers, with or without torch.

``ping``, ``dump_traceback`` and ``pyspy_dump`` keep the names and output of
torch's WorkerServer handlers; the rest (``set_log_level``, ``gc``,
``memory``, ``threads``, ``py_profile``, and the flight recorder's
``fr_trace_dump`` and ``fr_recent``) are what torch's server lacks and a
person chasing a slow or stuck job needs. Importing this module registers
them, each unless the program registered its own of that name; it does
nothing else, so it is cheap. The connection module imports it: whatever
serves handlers serves these.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from types import CodeType, FrameType
from typing import Any

from . import collectives
from .handlers import HandlerError, Request, Response, quick, register_default_handler
from .params import Params
from .pyspy import PYSPY_ENV, find_pyspy

JSON = "application/json"

PYSPY_TIMEOUT = 60.0
MAX_PROFILE_SECONDS = 300.0
# Threads of rankside itself are left out of profiles: they only ever wait.
OWN_THREAD_PREFIX = "rankside-"


def _json(data: Any) -> Response:
    return Response(json.dumps(data, indent=1), content_type=JSON)


# -- ping -------------------------------------------------------------------------


# ping and dump_traceback are quick (handlers.quick): answered by the
# connection thread itself, at once, even while every handler thread is busy,
# as torch's own server answers them. faulthandler bounds what it walks (100
# threads, 100 frames each) and writes to an anonymous file: no wait anywhere.
@quick
def ping(request: Request) -> Response:
    """``pong``, as torch's server answers."""
    return Response("pong")


# -- dump_traceback ---------------------------------------------------------------


def _scratch_fd() -> int:
    """An anonymous file: memfd where Linux has it (no filesystem round trip), else a temp file."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        with contextlib.suppress(OSError):
            fd: int = memfd_create("rankside-traceback", os.MFD_CLOEXEC)
            return fd
    fd, path = tempfile.mkstemp(prefix="rankside-traceback-")
    os.unlink(path)
    return fd


@quick
def dump_traceback(request: Request) -> Response:
    """Every thread's Python stack, exactly as faulthandler prints it (torch's format)."""
    Params(request)
    # faulthandler writes to a file descriptor, not to a Python stream, and a
    # pipe could fill up before anything reads it.
    fd = _scratch_fd()
    try:
        faulthandler.dump_traceback(fd, all_threads=True)
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return Response(b"".join(chunks))
    finally:
        os.close(fd)


# -- pyspy_dump -------------------------------------------------------------------

# Started as py-spy's future process: it waits until the worker has allowed it to
# ptrace, then becomes py-spy under the same pid (see _pyspy_run).
_EXEC_WHEN_ALLOWED = (
    "import os, sys\nsys.stdin.buffer.read(1)\nos.execv(sys.argv[1], sys.argv[1:])\n"
)
_PR_SET_PTRACER = 0x59616D61
_ptracer_lock = threading.Lock()


def _set_ptracer(pid: int) -> None:
    """Let ``pid`` ptrace us under Yama's ptrace_scope=1, where only ancestors may.

    Without Yama (or with another scope) prctl fails with EINVAL and nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PTRACER, pid, 0, 0, 0)


def _pyspy_run(argv: list[str]) -> tuple[int, str]:
    """Run py-spy on this process; (exit code, combined output)."""
    with _ptracer_lock:
        child = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _EXEC_WHEN_ALLOWED, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            _set_ptracer(child.pid)
            try:
                output, _ = child.communicate(b"\n", timeout=PYSPY_TIMEOUT)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
                raise HandlerError(
                    f"py-spy did not finish within {PYSPY_TIMEOUT:g} s", 504
                ) from None
        finally:
            _set_ptracer(0)
    return child.returncode, output.decode(errors="replace")


def pyspy_dump(request: Request) -> Response:
    """``py-spy dump`` of this process, with py-spy's options as real booleans."""
    options = ("native", "subprocesses", "nonblocking")
    params = Params(request, options)
    flags = [f"--{name}" for name in options if params.boolean(name)]
    pyspy = find_pyspy()
    if pyspy is None:
        raise HandlerError(
            "py-spy is not installed: `pip install py-spy` in the worker's environment, "
            f"or point {PYSPY_ENV} at the binary",
            500,
        )
    code, output = _pyspy_run([pyspy, "dump", "--pid", str(os.getpid()), *flags])
    if code == 0:
        return Response(output)
    if "permission" in output.lower() or "not permitted" in output.lower():
        raise HandlerError(
            f"py-spy may not attach to pid {os.getpid()}: it needs ptrace permission "
            "(same user and kernel.yama.ptrace_scope <= 1, or CAP_SYS_PTRACE; in a container "
            f"add the SYS_PTRACE capability). py-spy said: {output.strip()}",
            500,
        )
    raise HandlerError(f"py-spy dump failed with exit code {code}: {output.strip()}", 500)


# -- set_log_level ----------------------------------------------------------------

_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG", "NOTSET")


def _parse_level(value: str | None) -> int:
    if value is None:
        raise HandlerError(f"parameter 'level' is required ({', '.join(_LEVELS)} or a number)")
    if value.isdigit():
        return int(value)
    level = logging.getLevelName(value.upper())
    if value.upper() not in {*_LEVELS, "WARN", "FATAL"} or not isinstance(level, int):
        raise HandlerError(
            f"parameter 'level' must be one of {', '.join(_LEVELS)} or a number, got {value!r}"
        )
    return level


def set_log_level(request: Request) -> Response:
    """Set the level of ``logger`` (the root logger when absent) to ``level``."""
    params = Params(request, ("logger", "level"))
    name = params.string("logger", "")
    level = _parse_level(params.raw("level"))
    existed = not name or name in logging.root.manager.loggerDict
    logger = logging.getLogger(name or None)
    previous = logger.level
    logger.setLevel(level)
    return _json(
        {
            "logger": logger.name,
            "existed": existed,
            "previous": logging.getLevelName(previous),
            "level": logging.getLevelName(level),
            "effective": logging.getLevelName(logger.getEffectiveLevel()),
        }
    )


# -- gc ---------------------------------------------------------------------------


def collect_garbage(request: Request) -> Response:
    """``gc.collect(generation)`` with the counts before and after."""
    params = Params(request, ("generation",))
    generation = params.integer("generation", 2, 0, 2)
    before = {"counts": list(gc.get_count()), "objects": len(gc.get_objects())}
    start = time.perf_counter()
    collected = gc.collect(generation)
    seconds = time.perf_counter() - start
    after = {"counts": list(gc.get_count()), "objects": len(gc.get_objects())}
    return _json(
        {
            "generation": generation,
            "collected": collected,
            "uncollectable": len(gc.garbage),
            "seconds": seconds,
            "before": before,
            "after": after,
        }
    )


# -- memory -----------------------------------------------------------------------


def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in bytes, from Linux's /proc/self/status."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(rest.split()[0]) * 1024
    return found


def memory(request: Request) -> Response:
    """Resident memory, and tracemalloc's top allocation sites when it is tracing."""
    params = Params(request, ("top", "group"))
    top = params.integer("top", 10, 1, 1000)
    group = params.choice("group", "lineno", ("lineno", "filename"))
    status = _proc_status()
    result: dict[str, Any] = {
        "rss_bytes": status.get("VmRSS"),
        "peak_rss_bytes": status.get("VmHWM"),
        "gc_objects": len(gc.get_objects()),
        "tracemalloc": None,
    }
    if tracemalloc.is_tracing():
        current, peak = tracemalloc.get_traced_memory()
        stats = tracemalloc.take_snapshot().statistics(group)[:top]
        result["tracemalloc"] = {
            "current_bytes": current,
            "peak_bytes": peak,
            "top": [
                {
                    "file": stat.traceback[0].filename,
                    "line": stat.traceback[0].lineno if group == "lineno" else None,
                    "size_bytes": stat.size,
                    "count": stat.count,
                }
                for stat in stats
            ],
        }
    return _json(result)


# -- threads ----------------------------------------------------------------------


def threads(request: Request) -> Response:
    """Every Python thread: name, ident, native id, daemon, and which one is main."""
    Params(request)
    main = threading.main_thread()
    listed = [
        {
            "name": t.name,
            "ident": t.ident,
            "native_id": t.native_id,
            "daemon": t.daemon,
            "main": t is main,
            "alive": t.is_alive(),
        }
        for t in threading.enumerate()
    ]
    return _json({"count": len(listed), "threads": listed})


# -- py_profile -------------------------------------------------------------------


class _Sampler:
    """Samples every thread's Python stack with ``sys._current_frames()``.

    cProfile would see only the thread that runs it, and the interesting thread
    is the training one, so this samples all of them from the outside.
    """

    def __init__(self) -> None:
        self.stacks: Counter[tuple[str, ...]] = Counter()
        self.samples = 0
        self._labels: dict[CodeType, str] = {}
        self._names: dict[int, str] = {}

    def _label(self, code: CodeType) -> str:
        label = self._labels.get(code)
        if label is None:
            name = getattr(code, "co_qualname", code.co_name)
            label = f"{name} ({code.co_filename}:{code.co_firstlineno})"
            self._labels[code] = label
        return label

    def _thread_name(self, ident: int) -> str:
        name = self._names.get(ident)
        if name is None:
            self._names = {t.ident: t.name for t in threading.enumerate() if t.ident}
            name = self._names.get(ident, f"thread-{ident}")
        return name

    def _walk(self, frame: FrameType | None) -> Iterator[str]:
        while frame is not None:
            yield self._label(frame.f_code)
            frame = frame.f_back

    def run(self, duration: float, interval: float) -> None:
        me = threading.get_ident()
        end = time.monotonic() + duration
        while True:
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                thread = self._thread_name(ident)
                if thread.startswith(OWN_THREAD_PREFIX):
                    continue
                stack = list(self._walk(frame))
                stack.append(thread)
                stack.reverse()
                self.stacks[tuple(stack)] += 1
            self.samples += 1
            if time.monotonic() + interval > end:
                break
            time.sleep(interval)

    def collapsed(self) -> str:
        """Brendan Gregg's folded stacks: flamegraph.pl and speedscope open them."""
        return "".join(
            f"{';'.join(f.replace(';', ':') for f in stack)} {count}\n"
            for stack, count in self.stacks.most_common()
        )

    def summary(self, duration: float, interval: float, limit: int = 40) -> str:
        own: Counter[str] = Counter()
        total: Counter[str] = Counter()
        per_thread: Counter[str] = Counter()
        for stack, count in self.stacks.items():
            per_thread[stack[0]] += count
            own[stack[-1]] += count
            for frame in set(stack[1:]):
                total[frame] += count
        seen = sum(self.stacks.values()) or 1

        def table(title: str, counts: list[tuple[str, int]]) -> list[str]:
            rows = [f"  {n:8d} {100 * n / seen:5.1f}%  {what}" for what, n in counts]
            return ["", title, *rows]

        lines = [
            f"{self.samples} samples every {interval * 1000:g} ms over {duration:g} s "
            f"({seen} thread stacks)",
            *table("threads:", per_thread.most_common()),
            *table("self (innermost frame):", own.most_common(limit)),
            *table("total (anywhere on the stack):", total.most_common(limit)),
        ]
        return "\n".join(lines) + "\n"


def py_profile(request: Request) -> Response:
    """Sample every thread for ``duration`` seconds; ``format`` text (default) or collapsed."""
    params = Params(request, ("duration", "interval", "format"))
    duration = params.number("duration", 0, MAX_PROFILE_SECONDS, 5.0)
    interval = params.number("interval", 0, 1, 0.005)
    fmt = params.choice("format", "text", ("text", "collapsed"))
    sampler = _Sampler()
    sampler.run(duration, interval)
    if fmt == "collapsed":
        return Response(sampler.collapsed())
    return Response(sampler.summary(duration, interval))


# -- fr_trace_dump, fr_recent ---------------------------------------------------------


def fr_trace_dump(request: Request) -> Response:
    """The flight recorder as the pickle ``torchfrtrace`` reads, with the group table rebuilt.

    torch's own ``fr_trace_json`` ignores its parameters and keeps gloo's empty
    group table; this is ``_dump_fr_trace`` with every group's description and
    ranks filled in. ``includestacktraces`` (default true) and ``onlyactive``
    (default false) are torch's parameter names for the same choices; while
    the symbolizer warms up, the dump comes without stack traces rather than
    seconds late (``rankside_stack_traces`` in the dump says which).
    """
    params = Params(request, ("includestacktraces", "onlyactive"))
    stack_traces = params.boolean("includestacktraces", True)
    only_active = params.boolean("onlyactive", False)
    try:
        body = collectives.recorder_dump(stack_traces, only_active)
    except collectives.RecorderUnavailable as exc:
        raise HandlerError(str(exc), 409) from None
    return Response(body, content_type="application/octet-stream")


def fr_recent(request: Request) -> Response:
    """Per process group, the newest ``entries`` (8) collectives: seq, op, time, call site."""
    params = Params(request, ("entries",))
    per_group = params.integer("entries", 8, 1, collectives.MAX_RECENT)
    try:
        return _json(collectives.recent_collectives(per_group))
    except collectives.RecorderUnavailable as exc:
        raise HandlerError(str(exc), 409) from None


BUILTIN_HANDLERS = {
    "ping": ping,
    "dump_traceback": dump_traceback,
    "pyspy_dump": pyspy_dump,
    "set_log_level": set_log_level,
    "gc": collect_garbage,
    "memory": memory,
    "threads": threads,
    "py_profile": py_profile,
    "fr_trace_dump": fr_trace_dump,
    "fr_recent": fr_recent,
}

for _name, _fn in BUILTIN_HANDLERS.items():
    register_default_handler(_name, _fn)
