"""Every option of the ``rankside`` command line, declared once.

An ``Option`` carries its flags, help, environment variable, the validator
from ``sidecar/values.py`` that parses its value, and the ``Config`` field it
sets (whose default is the option's). Commands list the groups they take;
``add_options`` turns them into argparse arguments and ``config_from_args``
maps parsed arguments onto one frozen ``Config``. A bad value is a usage
error naming the option (exit 2), whether it came from the command line or
from the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar import values
from sidecar.client.http import DEFAULT_URL
from sidecar.config import DEFAULT_LISTEN, Config, ConfigError
from sidecar.schema import parse_ranks
from sidecar.tokens import TokenError, read_token

Parse = Callable[[str], Any]


def config_default(name: str) -> Any:
    """The default of ``Config`` field ``name``."""
    for item in dataclasses.fields(Config):
        if item.name == name:
            return item.default
    raise KeyError(name)


@dataclass(frozen=True)
class Option:
    """One command-line option.

    ``parse`` is None for a flag (store_true). ``field`` names the Config
    field the parsed value goes to as it is; options that shape a field
    (``--no-pyspy``, ``--allow-uid``) are mapped in ``config_from_args``.
    """

    flags: tuple[str, ...]
    help: str
    parse: Parse | None = None
    field: str | None = None
    env: str | None = None
    repeat: bool = False
    default: Any = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    # For a positional argument: argparse's nargs ("?", argparse.REMAINDER).
    nargs: str | None = None

    @property
    def dest(self) -> str:
        return self.flags[0].lstrip("-").replace("-", "_")

    @property
    def takes_value(self) -> bool:
        return self.parse is not None

    def add_to(self, parser: argparse._ActionsContainer) -> None:
        kwargs: dict[str, Any] = {"help": self.help}
        if self.flags[0].startswith("-"):
            kwargs["dest"] = self.dest
        if self.nargs is not None:
            kwargs["nargs"] = self.nargs
        default = config_default(self.field) if self.field else self.default
        if self.env is not None:
            # A string default goes through ``type`` like a value on the command
            # line, so a bad RANKSIDE_* value is refused just the same.
            default = os.environ.get(self.env) or default
        if self.parse is None:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = argparse_type(self.parse)
            kwargs["metavar"] = self.metavar
            kwargs["choices"] = self.choices
            if self.repeat:
                kwargs["action"] = "append"
                default = []
        parser.add_argument(*self.flags, default=default, **kwargs)


@dataclass(frozen=True)
class Exclusive:
    """Options of which a command line may give at most one."""

    options: tuple[Option, ...]


@dataclass(frozen=True)
class Group:
    """Options that go together; ``title`` shows them under a heading in --help."""

    options: tuple[Option | Exclusive, ...]
    title: str | None = None


def argparse_type(parse: Parse) -> Callable[[str], Any]:
    """``parse`` for argparse: its ValueError becomes a usage error that names the option."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def add_options(parser: argparse.ArgumentParser, groups: Iterable[Group]) -> None:
    for group in groups:
        container: argparse._ActionsContainer = (
            parser.add_argument_group(group.title) if group.title else parser
        )
        for item in group.options:
            if isinstance(item, Exclusive):
                exclusive = container.add_mutually_exclusive_group()
                for option in item.options:
                    option.add_to(exclusive)
            else:
                item.add_to(container)


# -- parsers that only the command line needs --------------------------------------


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def handler_names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise ValueError(f"names no handler: {text!r}")
    return names


def ranks_spec(text: str) -> str:
    parse_ranks(text)
    return text


def dns_name(text: str) -> str:
    values.host_and_port(text)
    return text


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def log_level(text: str) -> str:
    return text.lower()


# -- the options ---------------------------------------------------------------------

SERVE = Group(
    (
        Option(("--socket",), "unix socket path for workers (env RANKSIDE_SOCKET)",
               str, env="RANKSIDE_SOCKET"),
        Option(("--listen",), f"HTTP HOST:PORT (env RANKSIDE_LISTEN; default {DEFAULT_LISTEN})",
               values.listen_address, field="listen", env="RANKSIDE_LISTEN"),
        Option(("--socket-group-access",), "create the socket with mode 0660 instead of 0600"),
        Option(("--allow-uid",), "also accept worker peers of this uid (repeatable)",
               values.whole_number, repeat=True, metavar="UID"),
        Option(("--allow-gid",), "also accept worker peers of this gid (repeatable)",
               values.whole_number, repeat=True, metavar="GID"),
        Option(("--max-frame",), "largest frame a worker may send, in bytes (default 64 MiB)",
               values.count, field="max_frame", metavar="BYTES"),
        Option(("--max-frame-rate",),
               "frames a worker may send per second before it is read more slowly "
               "(default 100; replies to calls do not count)",
               values.positive_number, field="max_frame_rate", metavar="FRAMES"),
        Option(("--handshake-timeout",), "seconds a new connection has to say hello",
               values.seconds, field="handshake_timeout", metavar="SECONDS"),
        Option(("--grace",),
               "seconds an ended worker stays listed and its series exposed (default 300)",
               values.seconds, field="grace", metavar="SECONDS"),
        Option(("--call-timeout",), "default deadline of a relayed call, in seconds",
               values.seconds, field="default_call_timeout", metavar="SECONDS"),
        Option(("--max-call-timeout",), "largest ?timeout= a caller may ask for, in seconds",
               values.seconds, field="max_call_timeout", metavar="SECONDS"),
        Option(("--log-level",), "log level (env RANKSIDE_LOG_LEVEL; default info)",
               log_level, field="log_level", env="RANKSIDE_LOG_LEVEL", choices=LOG_LEVELS),
    )
)  # fmt: skip

ACCESS = Group(
    (
        Option(("--token-file",),
               "file holding the bearer token the API requires (env RANKSIDE_TOKEN_FILE)",
               str, env="RANKSIDE_TOKEN_FILE", metavar="PATH"),
        Option(("--metrics-auth",), "require the token for /metrics, /healthz and /readyz too",
               field="metrics_auth"),
        Option(("--insecure",), "allow listening on a non-loopback address without a token",
               field="insecure"),
        Option(("--cors-origin",),
               "let a browser page from ORIGIN call the API (repeatable; '*' for any)",
               str, repeat=True, metavar="ORIGIN"),
        Option(("--max-body",), "largest request body accepted, in bytes (default 1 MiB)",
               values.count, field="max_body", metavar="BYTES"),
        Option(("--header-timeout",),
               "seconds a client has to send a request line and headers (default 10)",
               values.seconds, field="header_timeout", metavar="SECONDS"),
        Option(("--max-connections",),
               "HTTP connections open at once; beyond them, 503 (default 1024)",
               values.count, field="max_connections", metavar="N"),
    )
)  # fmt: skip

STALLS = Group(
    (
        Option(("--stall-min",),
               "least seconds without progress that count as a stall (default 60)",
               values.seconds, field="stall_min", metavar="SECONDS"),
        Option(("--stall-factor",),
               "a stall is this many median step durations without progress (default 10)",
               values.positive_number, field="stall_factor", metavar="FACTOR"),
        Option(("--stall-after",),
               "fixed seconds without progress that count as a stall, instead of the two above",
               values.seconds, field="stall_after", metavar="SECONDS"),
        Option(("--heartbeat-timeout",),
               "seconds without a heartbeat on an open connection that count as a stall "
               "(default 10)", values.seconds, field="heartbeat_timeout", metavar="SECONDS"),
        Option(("--dump-dir",),
               "where dumps are written (env RANKSIDE_DUMP_DIR; default rankside-dumps/ "
               "beside the socket)", str, env="RANKSIDE_DUMP_DIR", metavar="PATH"),
        Option(("--dump-max-files",), "most dump files kept; the oldest go first (default 1000)",
               values.count, field="dump_max_files", metavar="N"),
        Option(("--dump-max-bytes",),
               "most bytes of dumps kept; the oldest go first (default 512 MiB)",
               values.count, field="dump_max_bytes", metavar="BYTES"),
        Option(("--dump-timeout",),
               "seconds a worker has to answer a dump before it is recorded as not answering "
               "and py-spy is tried (default 5)",
               values.seconds, field="dump_timeout", metavar="SECONDS"),
        Option(("--no-pyspy",), "never run py-spy on workers that do not answer"),
        Option(("--pyspy-native",), "include native frames in py-spy dumps",
               field="pyspy_native"),
        Option(("--dump-interval",),
               "also dump every worker every this many seconds (off by default)",
               values.seconds, field="dump_interval", metavar="SECONDS"),
        Option(("--dump-handlers",),
               "comma-separated handlers for periodic dumps (default dump_traceback)",
               handler_names, field="dump_handlers", metavar="NAMES"),
    ),
    title="stalls and dumps",
)  # fmt: skip

JOB = Group(
    (
        Option(("--target",),
               "a sidecar of the job (repeatable); results are merged by global rank",
               values.http_url, repeat=True, metavar="URL"),
        Option(("--dns",),
               "every address of this name is a sidecar of the job (a Kubernetes headless "
               "Service; repeatable)", dns_name, repeat=True, metavar="NAME:PORT"),
    )
)  # fmt: skip

NODE = Group(
    (
        Option(("--node-name",),
               "this node's name in incidents and verdicts (env RANKSIDE_NODE_NAME; "
               "default the host name)",
               values.node_name, field="node_name", env="RANKSIDE_NODE_NAME", metavar="NAME"),
    )
)  # fmt: skip

RUN = Group(
    (
        Option(("--ready-timeout",),
               "seconds the sidecar has to become ready before the command is not run",
               values.seconds, default=30.0, metavar="SECONDS"),
    )
)  # fmt: skip

# What ``rankside serve`` takes; ``rankside run`` takes it too, and RUN.
SERVE_GROUPS = (SERVE, ACCESS, STALLS, JOB, NODE)

RUN_COMMAND = Group(
    (
        Option(("cmd",), "the command to run beside the sidecar, e.g. torchrun ...",
               str, nargs=argparse.REMAINDER, metavar="-- COMMAND"),
    )
)  # fmt: skip

# -- the client commands' options -------------------------------------------------------

CONNECTION = Group(
    (
        Option(("--url",), f"the sidecar's HTTP address (env RANKSIDE_URL; default {DEFAULT_URL})",
               values.http_url, env="RANKSIDE_URL", default=DEFAULT_URL),
        Option(("--token",),
               "bearer token (env RANKSIDE_TOKEN; RANKSIDE_TOKEN_FILE keeps it off the "
               "command line)", str, env="RANKSIDE_TOKEN"),
        Option(("--token-file",), "file holding the bearer token (env RANKSIDE_TOKEN_FILE)",
               str, env="RANKSIDE_TOKEN_FILE", metavar="PATH"),
        Option(("--json",), "print JSON, for scripts"),
    )
)  # fmt: skip

CALL = Group(
    (
        Option(("name",), "handler name: dump_traceback, pyspy_dump, py_profile, ...", str),
        Exclusive(
            (
                Option(("--rank",), "one global rank; prints its body as it came",
                       values.whole_number),
                Option(("--ranks",), "ranks like 0,2-5 (default: every worker)", ranks_spec),
            )
        ),
        Option(("--param",), "handler parameter (repeatable), e.g. --param duration=5",
               key_value, repeat=True, metavar="KEY=VALUE"),
        Option(("--timeout",), "seconds each worker has to answer (sidecar default 30)",
               values.seconds, metavar="SECONDS"),
    )
)  # fmt: skip

DUMPS = Group(
    (
        Option(("id",), "print this dump's content", str, nargs="?"),
        Option(("--recorder",),
               "gather this incident's flight-recorder files from every node (--target, "
               "--dns) into --into, for torchfrtrace", str, metavar="INCIDENT"),
        Option(("--into",), "the directory --recorder writes to (created if missing)",
               str, metavar="DIR"),
    )
)  # fmt: skip

EVENTS = Group(
    (
        Option(("--follow", "-f"), "keep printing new events"),
        Option(("--limit",), "how many recent events (default 50)", values.count, default=50),
        Option(("--count",), "with --follow, exit after this many new events", values.count),
    )
)  # fmt: skip

TOP = Group(
    (
        Option(("--interval",), "seconds between refreshes (default 2)", values.seconds,
               default=2.0, metavar="SECONDS"),
        Option(("--iterations",), "exit after this many refreshes (default: run until q)",
               values.count),
        Option(("--once",), "draw once and exit"),
    )
)  # fmt: skip


def config_from_args(args: argparse.Namespace) -> Config:
    """The Config of the serve options in ``args``; SystemExit when they cannot run."""
    if not args.socket:
        raise SystemExit("rankside: no worker socket: pass --socket PATH or set RANKSIDE_SOCKET")
    fields: dict[str, Any] = {
        option.field: getattr(args, option.dest)
        for group in SERVE_GROUPS
        for option in group.options
        if isinstance(option, Option) and option.field is not None
    }
    token = None
    if args.token_file:
        try:
            token = read_token(args.token_file)
        except TokenError as exc:
            raise SystemExit(f"rankside: {exc}") from None
    fields.update(
        socket_path=os.path.abspath(args.socket),
        socket_mode=0o660 if args.socket_group_access else 0o600,
        allowed_uids=frozenset({os.getuid(), *args.allow_uid}),
        allowed_gids=frozenset(args.allow_gid),
        # Asking for a longer default than the maximum raises the maximum.
        max_call_timeout=max(args.max_call_timeout, args.call_timeout),
        token=token,
        cors_origins=tuple(args.cors_origin),
        dump_dir=os.path.abspath(args.dump_dir) if args.dump_dir else None,
        pyspy=not args.no_pyspy,
        targets=tuple(args.target),
        target_dns=tuple(args.dns),
    )
    try:
        return Config(**fields)
    except ConfigError as exc:
        raise SystemExit(f"rankside: {exc}") from None


def flags_with_values(groups: Sequence[Group]) -> tuple[str, ...]:
    """The flags in ``groups`` that take a value (``--ready-timeout 30``)."""
    return tuple(
        flag
        for group in groups
        for option in group.options
        if isinstance(option, Option) and option.takes_value
        for flag in option.flags
    )
