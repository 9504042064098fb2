"""The sidecar's settings, gathered from the command line and environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from worker_hooks.protocol import DEFAULT_MAX_FRAME

DEFAULT_LISTEN = "127.0.0.1:9478"


@dataclass
class Config:
    """Everything ``rankside serve`` can be told; defaults are the documented ones."""

    socket_path: str
    listen: str = DEFAULT_LISTEN
    # 0o600 by default: only the sidecar's own user may connect.
    socket_mode: int = 0o600
    max_frame: int = DEFAULT_MAX_FRAME
    handshake_timeout: float = 5.0
    # How long an exited or disconnected worker stays listed (and its series exposed).
    grace: float = 300.0
    default_call_timeout: float = 30.0
    max_call_timeout: float = 300.0
    log_level: str = "info"
    # Peers of these uids or gids may connect to the worker socket (SO_PEERCRED).
    allowed_uids: frozenset[int] = field(default_factory=lambda: frozenset({os.getuid()}))
    allowed_gids: frozenset[int] = frozenset()
    # Housekeeping period: pruning ended workers after their grace period.
    housekeeping_interval: float = 1.0
    # Access control (sidecar/http/access.py): with a token every route but the probes
    # and /metrics (those too with metrics_auth) needs "Authorization: Bearer".
    token: str | None = None
    metrics_auth: bool = False
    insecure: bool = False
    cors_origins: tuple[str, ...] = ()
    max_body: int = 1024 * 1024
    # Stall detection: no progress for max(stall_min, stall_factor x median
    # step), or exactly stall_after when set; or no heartbeat for heartbeat_timeout.
    stall_min: float = 60.0
    stall_factor: float = 10.0
    stall_after: float | None = None
    heartbeat_timeout: float = 10.0
    # Where incident and periodic dumps go; by default next to the socket.
    dump_dir: str | None = None
    dump_max_files: int = 1000
    dump_max_bytes: int = 512 * 1024 * 1024
    # How long a worker has to answer dump_traceback before py-spy is tried.
    dump_timeout: float = 5.0
    pyspy: bool = True
    pyspy_native: bool = False
    dump_interval: float = 0.0
    dump_handlers: tuple[str, ...] = ("dump_traceback",)
    # The job's sidecars, for the job-wide routes (sidecar/http/job.py): URLs, and
    # NAME:PORT of headless Services resolved on every request.
    targets: tuple[str, ...] = ()
    target_dns: tuple[str, ...] = ()

    @property
    def dump_path(self) -> str:
        return self.dump_dir or os.path.join(os.path.dirname(self.socket_path), "rankside-dumps")

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_listen(self.listen)


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:PORT`` for IPv6) and check the port."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"listen address {value!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"listen address {value!r} has no numeric port") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"listen port {port} is out of range")
    return host, port
