"""Torch's own control-plane handlers, answered through rankside.

Nothing here imports torch. The connection thread calls :func:`sync` a few
times a second; once the training script has imported torch (fully: a module
still executing its import is left alone), every handler in torch's C++
registry that rankside does not already answer is registered under its own
name, and later additions follow on the next sync.

A bridged call runs torch's handler in-process through ``_get_handler`` with
subclasses of ``_Request`` and ``_Response``, so its behaviour is torch's. One
thing pybind11 cannot carry from Python is the parameter multimap that some C++
handlers read (``dump_nccl_trace_*`` validate their parameters that way), nor
binary content a C++ handler produces (it decodes it as UTF-8). Those calls go
to a private torch ``_WorkerServer`` on a unix socket in a 0700 directory,
started the first time one is needed, so they too get torch's exact answer.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import logging
import os
import socket
import sys
import tempfile
import threading
import urllib.parse
from functools import cache
from typing import Any

from .builtin_handlers import MAX_PROFILE_SECONDS
from .handlers import Request, Response, handler_names, register_handler
from .params import Params

log = logging.getLogger("rankside.worker")

# Handlers torch registers from Python, in a module that nothing imports by default.
TORCH_HANDLER_MODULES = ("torch.distributed.debug._handlers",)
PRIVATE_SERVER_TIMEOUT = 300.0

_lock = threading.Lock()
_last_names: list[str] = []
_imported_handler_modules = False
_server: Any = None
_server_path: str | None = None


def _check_torch_profile(request: Request) -> None:
    # torch would answer a missing or bad duration with a 500 from float().
    Params(request, ("duration",)).number("duration", 0, MAX_PROFILE_SECONDS)


# Parameter checks run before torch's handler, for handlers whose own checks
# are weaker than rankside's rule (a bad parameter is a 400 that names it).
PRECHECKS = {"torch_profile": _check_torch_profile}


class _NeedsParamMap(Exception):
    """A C++ handler asked for the whole parameter multimap, which pybind11 cannot pass."""


def torch_c10d() -> Any | None:
    """``torch._C._distributed_c10d`` if torch is imported completely, else None; never imports."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    spec = getattr(torch, "__spec__", None)
    if spec is None or getattr(spec, "_initializing", False):
        return None
    return getattr(getattr(torch, "_C", None), "_distributed_c10d", None)


def sync() -> list[str]:
    """Bridge the torch handlers rankside does not answer yet; returns the names added."""
    c10d = torch_c10d()
    if c10d is None:
        return []
    global _last_names, _imported_handler_modules
    with _lock:
        if not _imported_handler_modules:
            _imported_handler_modules = True
            for module in TORCH_HANDLER_MODULES:
                try:
                    __import__(module)
                except Exception as exc:  # an optional torch feature; never fatal
                    log.debug("rankside: could not import %s: %s", module, exc)
        names = sorted(c10d._get_handler_names())
        if names == _last_names:
            return []
        _last_names = names
    ours = set(handler_names())
    added = [name for name in names if name not in ours]
    for name in added:
        register_handler(name, TorchHandler(name))
    return added


def bridge(name: str, torch_name: str | None = None) -> None:
    """Answer ``name`` with torch's handler ``torch_name`` (default: the same name).

    For a torch handler that a rankside built-in shadows, such as torch's own
    ``pyspy_dump``, under another name.
    """
    register_handler(name, TorchHandler(torch_name or name))


@cache
def _classes(c10d: Any) -> tuple[type, type]:
    """Subclasses of torch's ``_Request`` and ``_Response``, made once torch is there."""

    class TorchRequest(c10d._Request):  # type: ignore[misc]
        def __init__(self, request: Request) -> None:
            super().__init__()
            self._request = request

        def body(self) -> bytes:
            return self._request.body

        def get_param(self, name: str) -> str:
            # torch's C++ getParam answers "" for a missing parameter.
            return self._request.get_param(name) or ""

        def params(self) -> Any:
            raise _NeedsParamMap

    class TorchResponse(c10d._Response):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.status = 200
            self.content: bytes | str = b""
            self.content_type = "text/plain"

        def set_content(self, content: bytes | str, content_type: str) -> None:
            self.content = content
            self.content_type = content_type

        def set_status(self, status: int) -> None:
            self.status = status

    return TorchRequest, TorchResponse


class TorchHandler:
    """A rankside handler that runs torch's handler ``torch_name``."""

    def __init__(self, torch_name: str) -> None:
        self.torch_name = torch_name

    def __call__(self, request: Request) -> Response:
        c10d = torch_c10d()
        if c10d is None:
            raise RuntimeError("torch is not imported in this worker")
        precheck = PRECHECKS.get(self.torch_name)
        if precheck is not None:
            precheck(request)
        # Raises ValueError "Failed to find handler ..." if torch no longer has it.
        fn = c10d._get_handler(self.torch_name)
        request_class, response_class = _classes(c10d)
        torch_response = response_class()
        try:
            fn(request_class(request), torch_response)
        except (_NeedsParamMap, UnicodeDecodeError):
            return _via_private_server(c10d, self.torch_name, request)
        return Response(torch_response.content, torch_response.status, torch_response.content_type)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _private_server(c10d: Any) -> str:
    global _server, _server_path
    with _lock:
        if _server_path is None:
            directory = tempfile.mkdtemp(prefix="rankside-torch-")  # mode 0700
            path = os.path.join(directory, "worker.sock")
            _server = c10d._WorkerServer(path)
            _server_path = path
            atexit.register(_stop_private_server)
        return _server_path


def _stop_private_server() -> None:
    global _server, _server_path
    with _lock:
        server, path = _server, _server_path
        _server = _server_path = None
    if server is not None:
        server.shutdown()
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)
            os.rmdir(os.path.dirname(path))


def _via_private_server(c10d: Any, name: str, request: Request) -> Response:
    path = _private_server(c10d)
    query = urllib.parse.urlencode(request.params)
    target = f"/handler/{urllib.parse.quote(name)}" + (f"?{query}" if query else "")
    connection = _UnixHTTPConnection(path, PRIVATE_SERVER_TIMEOUT)
    try:
        connection.request("POST", target, body=request.body)
        reply = connection.getresponse()
        body = reply.read()
        content_type = reply.getheader("Content-Type", "text/plain")
        return Response(body, reply.status, content_type)
    finally:
        connection.close()
