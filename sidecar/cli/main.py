"""``rankside``: the command line's entry point, its subcommands and their dispatch.

Every subcommand is a function of the parsed arguments returning the exit
status, set as ``run`` on its parser; its options are the groups declared in
``sidecar/cli/options.py``. Exit codes: 0 success; 1 failure; 2 a usage error
(a bad option or value, named); 3 a partial result (client commands).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sidecar.cli import commands, options
from sidecar.cli.run import run
from sidecar.cli.serve import serve
from sidecar.client.http import ClientError

Command = Callable[[argparse.Namespace], int]


def cmd_serve(args: argparse.Namespace) -> int:
    return serve(options.config_from_args(args))


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    groups: tuple[options.Group, ...]
    run: Command
    description: str | None = None


SUBCOMMANDS = (
    Subcommand("serve", "run the node sidecar", options.SERVE_GROUPS, cmd_serve),
    Subcommand(
        "run",
        "run a command (torchrun ...) with the node sidecar beside it",
        (*options.SERVE_GROUPS, options.RUN, options.RUN_COMMAND),
        run,
        description="Start the sidecar with serve's options, run COMMAND with "
        "RANKSIDE_SOCKET set, stop the sidecar once COMMAND ends and exit with its status.",
    ),
    Subcommand(
        "workers",
        "list the workers (of a node, or of a job by global rank)",
        (options.CONNECTION, options.JOB),
        commands.cmd_workers,
    ),
    Subcommand(
        "call",
        "call a handler on some or all workers",
        (options.CALL, options.CONNECTION, options.JOB),
        commands.cmd_call,
    ),
    Subcommand(
        "dumps",
        "list the node's dumps, print one, or gather an incident's recorder files",
        (options.DUMPS, options.CONNECTION, options.JOB),
        commands.cmd_dumps,
    ),
    Subcommand(
        "diagnose",
        "capture the node's (or job's) stacks now and name the culprit ranks",
        (options.CONNECTION, options.JOB),
        commands.cmd_diagnose,
        description="Capture every worker's stacks and print the verdict: the culprit "
        "ranks and why, the collective the others wait in, the stacks grouped by rank. "
        "With --target/--dns, every node of the job captures under one incident id and "
        "the verdict is the job's, kept on every node.",
    ),
    Subcommand(
        "events",
        "print recent events; --follow for new ones",
        (options.EVENTS, options.CONNECTION, options.JOB),
        commands.cmd_events,
    ),
    Subcommand(
        "top",
        "a live view of the workers, worst first",
        (options.TOP, options.CONNECTION, options.JOB),
        commands.cmd_top,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rankside", description="Per-node observability and control for training jobs."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for sub in SUBCOMMANDS:
        sub_parser = subparsers.add_parser(sub.name, help=sub.help, description=sub.description)
        options.add_options(sub_parser, sub.groups)
        sub_parser.set_defaults(run=sub.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # ``run`` passes serve's options on to the sidecar it starts, as they were given.
    args = build_parser().parse_args(argv, namespace=argparse.Namespace(argv=argv))
    logging.basicConfig(
        level=args.log_level.upper() if hasattr(args, "log_level") else "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    command: Command = args.run
    try:
        return command(args)
    except ClientError as exc:
        print(f"rankside: {exc}", file=sys.stderr)
        return commands.FAILED
    except BrokenPipeError:
        # `rankside events | head`: the reader has gone, which is not an error.
        sys.stderr.close()
        return commands.OK


if __name__ == "__main__":
    sys.exit(main())
