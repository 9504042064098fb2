"""``rankside``: the command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from sidecar.cli.commands import add_client_commands, run_client_command
from sidecar.cli.run import add_run_options, run
from sidecar.client.http import add_target_options, targets_from_args
from sidecar.config import DEFAULT_LISTEN, Config, parse_listen
from sidecar.http.access import access_settings, add_access_options
from sidecar.node.stalls import add_stall_options, stall_settings

log = logging.getLogger("rankside.sidecar")


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _listen(text: str) -> str:
    try:
        parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``serve``, shared with every command that starts a sidecar."""
    parser.add_argument(
        "--socket",
        default=os.environ.get("RANKSIDE_SOCKET"),
        help="unix socket path for workers (env RANKSIDE_SOCKET)",
    )
    parser.add_argument(
        "--listen",
        type=_listen,
        default=os.environ.get("RANKSIDE_LISTEN", DEFAULT_LISTEN),
        help=f"HTTP HOST:PORT (env RANKSIDE_LISTEN; default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--socket-group-access",
        action="store_true",
        help="create the socket with mode 0660 instead of 0600",
    )
    parser.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        default=[],
        help="also accept worker peers of this uid (repeatable)",
    )
    parser.add_argument(
        "--allow-gid",
        type=int,
        action="append",
        default=[],
        help="also accept worker peers of this gid (repeatable)",
    )
    parser.add_argument(
        "--max-frame",
        type=int,
        default=Config.max_frame,
        help="largest frame a worker may send, in bytes (default 64 MiB)",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=_positive,
        default=Config.handshake_timeout,
        help="seconds a new connection has to say hello",
    )
    parser.add_argument(
        "--grace",
        type=_positive,
        default=Config.grace,
        help="seconds an ended worker stays listed and its series exposed (default 300)",
    )
    parser.add_argument(
        "--call-timeout",
        type=_positive,
        default=Config.default_call_timeout,
        help="default deadline of a relayed call, in seconds",
    )
    parser.add_argument(
        "--max-call-timeout",
        type=_positive,
        default=Config.max_call_timeout,
        help="largest ?timeout= a caller may ask for, in seconds",
    )
    parser.add_argument("--log-level", default=os.environ.get("RANKSIDE_LOG_LEVEL", "info"))
    add_access_options(parser)
    add_stall_options(parser)
    add_target_options(parser)


def job_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Config fields from ``--target`` and ``--dns``: the sidecars of the job view."""
    targets = targets_from_args(args)
    return {"targets": targets.urls, "target_dns": targets.dns}


def config_from_args(args: argparse.Namespace) -> Config:
    if not args.socket:
        raise SystemExit("rankside: no worker socket: pass --socket PATH or set RANKSIDE_SOCKET")
    return Config(
        socket_path=os.path.abspath(args.socket),
        listen=args.listen,
        socket_mode=0o660 if args.socket_group_access else 0o600,
        allowed_uids=frozenset({os.getuid(), *args.allow_uid}),
        allowed_gids=frozenset(args.allow_gid),
        max_frame=args.max_frame,
        handshake_timeout=args.handshake_timeout,
        grace=args.grace,
        default_call_timeout=args.call_timeout,
        max_call_timeout=max(args.max_call_timeout, args.call_timeout),
        log_level=args.log_level,
        **access_settings(args),
        **stall_settings(args),
        **job_settings(args),
    )


def serve(config: Config) -> int:
    """Run the sidecar until SIGTERM or SIGINT."""
    import uvicorn

    from sidecar.http.app import create_app
    from sidecar.http.limits import http_protocol
    from sidecar.node.service import Sidecar
    from sidecar.node.socket_server import SocketInUse, bind_unix_socket

    try:
        listener = bind_unix_socket(config.socket_path, config.socket_mode)
    except (SocketInUse, OSError) as exc:
        print(f"rankside: {exc}", file=sys.stderr)
        return 1
    host, port = config.host_port
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(Sidecar(config, listener)),
            host=host,
            port=port,
            log_level=config.log_level,
            access_log=False,
            lifespan="on",
            # Shut down within the 2 s a pod's preStop budget expects.
            timeout_graceful_shutdown=1,
            **http_protocol(),
        )
    )
    # uvicorn re-raises the signal that stopped it once it has shut down; a
    # no-op handler underneath makes SIGTERM and SIGINT a clean exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    server.run()
    return 0 if server.started else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rankside", description="Per-node observability and control for training jobs."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the node sidecar")
    add_serve_options(serve_parser)
    run_parser = commands.add_parser(
        "run",
        help="run a command (torchrun ...) with the node sidecar beside it",
        description="Start the sidecar with serve's options, run COMMAND with "
        "RANKSIDE_SOCKET set, stop the sidecar once COMMAND ends and exit with its status.",
    )
    add_serve_options(run_parser)
    add_run_options(run_parser)
    add_client_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper() if hasattr(args, "log_level") else "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "serve":
        return serve(config_from_args(args))
    if args.command == "run":
        return run(args, argv)
    if hasattr(args, "client_command"):
        return run_client_command(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
