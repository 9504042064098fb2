"""``worker_main()``: the drop-in replacement for torch's control-plane entry."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from . import protocol
from .connection import Connection
from .identity import Identity

log = logging.getLogger("rankside.worker")

SOCKET_ENV = "RANKSIDE_SOCKET"
TORCH_SOCKET_ENV = "TORCH_WORKER_SERVER_SOCKET"
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"

_active_lock = threading.Lock()
_active: Connection | None = None


def current_connection() -> Connection | None:
    """The live sidecar connection of this process, if ``worker_main()`` started one."""
    return _active


def record_error_file(exc: BaseException) -> None:
    """Write ``exc`` where torchrun looks for a worker's failure.

    The layout is the one ``torch.distributed.elastic.multiprocessing.errors``
    writes, so torchrun's error summary names the real root cause.
    """
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    data = {
        "message": {
            "message": f"{type(exc).__name__}: {exc}",
            "extraInfo": {
                "py_callstack": "".join(
                    traceback.format_exception(type(exc), exc, exc.__traceback__)
                ),
                "timestamp": str(int(time.time())),
            },
        }
    }
    try:
        with open(path, "w") as fp:
            json.dump(data, fp)
    except OSError as err:
        log.warning("rankside: could not write the error file %s: %s", path, err)


@contextmanager
def _torch_worker_server(socket_path: str) -> Iterator[None]:
    """Start torch's own per-worker server too, so switching loses nothing."""
    try:
        from torch._C._distributed_c10d import _WorkerServer
    except ImportError:
        log.info("rankside: %s is set but torch is not importable", TORCH_SOCKET_ENV)
        yield
        return
    server = _WorkerServer(socket_path)
    try:
        yield
    finally:
        server.shutdown()


def _connect(path: str) -> Connection:
    global _active
    with _active_lock:
        if _active is not None:
            return _active
        connection = Connection(path, Identity.from_environ())
        connection.start()
        _active = connection
        os.register_at_fork(after_in_child=connection.after_fork_in_child)
        return connection


def _disconnect(connection: Connection, bye: dict[str, Any]) -> None:
    global _active
    with _active_lock:
        if _active is connection:
            _active = None
    connection.close(bye)


@contextmanager
def worker_main() -> Iterator[None]:
    """Wrap a training entry point: ``with worker_main():`` or ``@worker_main()``.

    Connects this process to the node sidecar named by ``RANKSIDE_SOCKET`` (inert
    without it), enables faulthandler, records an uncaught exception of the body
    in ``TORCHELASTIC_ERROR_FILE`` and tells the sidecar how the worker ended.
    With ``TORCH_WORKER_SERVER_SOCKET`` set and torch present it also starts
    torch's own ``_WorkerServer``, as ``torch.distributed.elastic.control_plane``
    does.
    """
    faulthandler.enable(all_threads=True)
    with ExitStack() as stack:
        torch_socket = os.environ.get(TORCH_SOCKET_ENV)
        if torch_socket:
            stack.enter_context(_torch_worker_server(torch_socket))
        path = os.environ.get(SOCKET_ENV)
        connection: Connection | None = None
        if path:
            connection = _connect(path)
        else:
            # A warning, so it shows on stderr with no logging set up (the
            # last-resort handler prints WARNING and up): an INFO line went unseen.
            log.warning("rankside: %s is not set; worker hooks are inactive", SOCKET_ENV)
        try:
            yield
        except BaseException as exc:
            # SystemExit(0) is a clean end: the finally below says "exit". Any
            # other exception ends the worker and is reported to the sidecar;
            # the error file gets what torch's ``record`` writes, an Exception
            # (not SystemExit, not KeyboardInterrupt: a Ctrl-C stops a job, it
            # is not the root cause torchrun should report).
            if not (isinstance(exc, SystemExit) and exc.code in (0, None)):
                if isinstance(exc, Exception):
                    record_error_file(exc)
                if connection is not None:
                    _disconnect(connection, _bye_for(exc))
                    connection = None
            raise
        finally:
            if connection is not None:
                _disconnect(connection, {"reason": "exit"})


def _bye_for(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, SystemExit):
        return {"reason": "exit", "exit_code": exc.code if isinstance(exc.code, int) else 1}
    try:
        message = str(exc)
    except Exception as err:  # a __str__ that raises must not lose the type too
        message = f"<str() failed: {type(err).__name__}>"
    # Cut and escaped here: a message over the header limit, or with a lone
    # surrogate, made a bye the sidecar refused, and the runbook lost the cause.
    return {
        "reason": "exception",
        "exc_type": protocol.exit_text(type(exc).__name__),
        "exc_message": protocol.exit_text(message),
    }
