"""The sidecar's settings: one frozen ``Config`` with every setting and its default.

``rankside serve`` builds it from the command line (``sidecar/cli/options.py``
declares each option once and maps it onto a field here); tests and embedders
build it directly. Either way ``__post_init__`` checks every value with the
validators of ``sidecar/values.py``, so a NaN grace period or a listen address
open to the network without a token never reaches a running sidecar.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from sidecar.values import (
    check_count,
    check_positive,
    check_seconds,
    host_and_port,
    is_loopback,
    node_name,
)
from worker_hooks.protocol import DEFAULT_MAX_FRAME

DEFAULT_LISTEN = "127.0.0.1:9478"


class ConfigError(ValueError):
    """A setting that the sidecar cannot run with; the message names it."""


@dataclass(frozen=True)
class Config:
    """Everything ``rankside serve`` can be told; defaults are the documented ones."""

    socket_path: str
    listen: str = DEFAULT_LISTEN
    # 0o600 by default: only the sidecar's own user may connect.
    socket_mode: int = 0o600
    max_frame: int = DEFAULT_MAX_FRAME
    # Frames a worker may send per second, in bursts of as many, before its
    # connection is read more slowly (replies to the sidecar's calls are free).
    max_frame_rate: float = 100.0
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
    # Access control (sidecar/http/access.py): with a token every route but the
    # probes and /metrics (those too with metrics_auth) needs "Authorization: Bearer".
    token: str | None = None
    metrics_auth: bool = False
    # Listening beyond loopback without a token is refused unless this is set.
    insecure: bool = False
    cors_origins: tuple[str, ...] = ()
    max_body: int = 1024 * 1024
    # Hostile HTTP clients (sidecar/http/limits.py): a request line and headers
    # must arrive within header_timeout; beyond max_connections open, 503.
    header_timeout: float = 10.0
    max_connections: int = 1024
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
    # Periodic dumps of every worker, every this many seconds; None: none.
    dump_interval: float | None = None
    dump_handlers: tuple[str, ...] = ("dump_traceback",)
    # The job's sidecars, for the job-wide routes (sidecar/http/job.py): URLs,
    # and NAME:PORT of headless Services resolved on every request.
    targets: tuple[str, ...] = ()
    target_dns: tuple[str, ...] = ()
    # This node's name in incidents and verdicts; empty: the host name.
    node_name: str = ""

    def __post_init__(self) -> None:
        try:
            self._check()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def _check(self) -> None:
        for name in (
            "handshake_timeout",
            "grace",
            "default_call_timeout",
            "max_call_timeout",
            "housekeeping_interval",
            "stall_min",
            "heartbeat_timeout",
            "dump_timeout",
            "header_timeout",
        ):
            check_seconds(name, getattr(self, name))
        check_positive("max_frame_rate", self.max_frame_rate)
        check_positive("stall_factor", self.stall_factor)
        for name in ("stall_after", "dump_interval"):
            value = getattr(self, name)
            if value is not None:
                check_seconds(name, value)
        for name in (
            "max_frame",
            "max_body",
            "max_connections",
            "dump_max_files",
            "dump_max_bytes",
        ):
            check_count(name, getattr(self, name))
        for uid in (*self.allowed_uids, *self.allowed_gids):
            check_count("an allowed uid or gid", uid, minimum=0)
        if self.max_call_timeout < self.default_call_timeout:
            raise ValueError(
                f"max_call_timeout ({self.max_call_timeout:g} s) is below "
                f"default_call_timeout ({self.default_call_timeout:g} s)"
            )
        if self.node_name:
            node_name(self.node_name)
        if not self.dump_handlers:
            raise ValueError("dump_handlers names no handler")
        host, _ = host_and_port(self.listen, port_zero=True)
        if self.token is None and not is_loopback(host) and not self.insecure:
            raise ValueError(
                f"refusing to listen on {self.listen} without a token: anyone who can "
                "reach it could profile and dump every worker. Pass --token-file "
                "(or RANKSIDE_TOKEN_FILE), listen on 127.0.0.1, or pass --insecure."
            )

    @property
    def dump_path(self) -> str:
        return self.dump_dir or os.path.join(os.path.dirname(self.socket_path), "rankside-dumps")

    @property
    def node(self) -> str:
        """This node's name: ``node_name``, else the host name."""
        return self.node_name or socket.gethostname()

    @property
    def host_port(self) -> tuple[str, int]:
        return host_and_port(self.listen, port_zero=True)
