"""The client commands of ``rankside``: workers, call, dumps, events, top.

Each talks to a sidecar's HTTP API: the one at ``--url`` (RANKSIDE_URL), or,
for workers, call, events and top, every sidecar of a job (``--target``,
``--dns``), merged by global rank. Output is for people by default and JSON
with ``--json``.

Exit codes: 0 success; 1 failure (nothing answered, a refused token, a bad
request); 2 a usage error; 3 a partial result (a node unreachable, a rank
that did not answer 200).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sidecar.cli import tables as present
from sidecar.cli import top
from sidecar.client.http import (
    DEFAULT_TIMEOUT,
    AnswerError,
    Client,
    ClientError,
    ConnectError,
    http_client,
    token_from,
)
from sidecar.client.job import (
    JobRank,
    JobWorkers,
    NodeStatus,
    job_call,
    job_events,
    job_workers,
    parallel,
)
from sidecar.client.sse import EventStream
from sidecar.client.targets import Targets
from sidecar.node.incidents import Incident, IncidentKind, new_incident_id
from sidecar.node.jobwide import NodeCapture, job_incident
from sidecar.schema import parse_ranks
from sidecar.values import is_decimal

OK = 0
FAILED = 1
USAGE = 2
PARTIAL = 3
# How long a followed stream waits before it reconnects to a node it lost.
RECONNECT_SECONDS = 2.0

Command = Callable[[argparse.Namespace], int]


@dataclass
class Nodes:
    """The sidecars a command talks to, and the names that did not resolve."""

    clients: list[Client]
    failed: list[NodeStatus]
    job: bool

    @property
    def where(self) -> str:
        if not self.job:
            return self.clients[0].url
        return f"job ({len(self.clients) + len(self.failed)} nodes)"


@contextmanager
def connect(args: argparse.Namespace, timeout: float = DEFAULT_TIMEOUT) -> Iterator[Nodes]:
    """Clients for ``--target``/``--dns`` when given, else for ``--url``; one
    connection pool for all of them, closed when the command is done."""
    token = token_from(args.token, args.token_file)
    # --target and --dns are checked as they are parsed (sidecar/cli/options.py).
    targets = Targets(tuple(args.target), tuple(args.dns)) if hasattr(args, "target") else Targets()
    if not targets and not args.url.startswith(("http://", "https://")):
        raise ClientError(f"--url {args.url!r} is not an http:// or https:// URL")
    with http_client(timeout) as http:
        if not targets:
            yield Nodes([Client(args.url, token, timeout, http)], [], job=False)
            return
        urls, failed = targets.resolve()
        yield Nodes([Client(url, token, timeout, http) for url in urls], failed, job=True)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _hint(nodes: Nodes, status: NodeStatus) -> str:
    """Why a node did not answer, with what to try next when it is the one node asked."""
    error = status.error or "no answer"
    if not nodes.job and isinstance(status.failure, ConnectError):
        return (
            f"{error}. Is `rankside serve` running there? Point --url (or RANKSIDE_URL) at "
            "the sidecar's --listen address."
        )
    return error


def _fail_all(nodes: Nodes, statuses: Sequence[NodeStatus]) -> int:
    for status in statuses:
        print(f"rankside: {_hint(nodes, status)}", file=sys.stderr)
    return FAILED


# -- workers ----------------------------------------------------------------------


def fetch_workers(nodes: Nodes) -> JobWorkers:
    return job_workers(nodes.clients, nodes.failed)


def view_status(view: JobWorkers) -> int:
    if view.nodes and all(not n.ok for n in view.nodes):
        return FAILED
    return PARTIAL if view.unreachable else OK


def cmd_workers(args: argparse.Namespace) -> int:
    with connect(args) as nodes:
        view = fetch_workers(nodes)
    status = view_status(view)
    if status == FAILED:
        return _fail_all(nodes, view.nodes)
    if args.json:
        _print_json(view.to_json())
        return status
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    if view.workers:
        print("\n".join(present.worker_lines(view, nodes.job, color=color)))
    print(present.summary_line(view, nodes.job))
    for line in present.unreachable_lines(view.nodes, color):
        print(line)
    return status


# -- call -------------------------------------------------------------------------


def cmd_call(args: argparse.Namespace) -> int:
    if args.rank is not None:
        ranks: list[int] | None = [args.rank]
    elif args.ranks is not None:
        try:
            ranks = parse_ranks(args.ranks)
        except ValueError as exc:
            raise ClientError(str(exc)) from None
    else:
        ranks = None
    with connect(args) as nodes:
        result = job_call(nodes.clients, args.name, ranks, args.param, args.timeout, nodes.failed)
    summary = result.summary
    if not result.ranks:
        for missing in result.missing:
            print(
                f"rankside: no worker with rank {missing} on "
                f"{'any node that answered' if nodes.job else nodes.where}; "
                "`rankside workers` lists them",
                file=sys.stderr,
            )
        _fail_all(nodes, [n for n in result.nodes if not n.ok])
        if not result.missing and all(n.ok for n in result.nodes):
            print(f"rankside: no workers on {nodes.where}", file=sys.stderr)
        return FAILED
    if args.json:
        _print_json(result.to_json())
    elif args.rank is not None:
        _print_single(next(iter(result.ranks.values())))
    else:
        _print_ranks(result.ranks, nodes.job)
    if summary["ok"] == 0:
        return FAILED
    clean = summary["ok"] == summary["workers"] and not result.missing and not result.unreachable
    if not clean and not args.json:
        _print_call_problems(result.ranks, result.missing, result.nodes)
    return OK if clean else PARTIAL


def _body_bytes(answer: JobRank) -> bytes:
    if answer.get("encoding") == "base64":
        return base64.b64decode(answer["body"])
    return str(answer.get("body", "")).encode()


def _print_single(answer: JobRank) -> None:
    """One rank's answer as it came, like curl: bytes to stdout, or to stderr on failure."""
    body = _body_bytes(answer)
    stream = sys.stdout if answer.get("status") == 200 else sys.stderr
    stream.flush()
    stream.buffer.write(body if body.endswith(b"\n") or not body else body + b"\n")
    stream.buffer.flush()


def _print_ranks(ranks: Mapping[str, JobRank], job: bool) -> None:
    for key, answer in ranks.items():
        where = f" @ {present.node_name(answer['node'])}" if job else ""
        print(f"=== rank {key}{where}: {answer.get('status')} ===")
        if answer.get("encoding") == "base64":
            size = len(_body_bytes(answer))
            print(f"({size} bytes of {answer.get('content_type')}; --json has them in base64)")
        else:
            print(str(answer.get("body", "")).rstrip("\n"))
        print()


def _print_call_problems(
    ranks: Mapping[str, JobRank], missing: list[int], nodes: list[NodeStatus]
) -> None:
    failed = [key for key, answer in ranks.items() if answer.get("status") != 200]
    if failed:
        print(f"rankside: no 200 from rank {', '.join(failed)}", file=sys.stderr)
    if missing:
        ranks_text = ", ".join(map(str, missing))
        print(f"rankside: rank {ranks_text} not found on any node", file=sys.stderr)
    for node in nodes:
        if not node.ok:
            print(f"rankside: UNREACHABLE {node.url}: {node.error}", file=sys.stderr)


# -- dumps ------------------------------------------------------------------------


def cmd_dumps(args: argparse.Namespace) -> int:
    if (args.recorder is None) != (args.into is None):
        print("rankside dumps: --recorder INCIDENT and --into DIR go together", file=sys.stderr)
        return USAGE
    with connect(args) as nodes:
        if args.recorder is not None:
            return _gather_recorder(nodes, args.recorder, args.into)
        return _dumps(nodes.clients[0], args.id, args.json)


RECORDER_FILE = "fr_trace_rank_"


def _gather_recorder(nodes: Nodes, incident: str, into: str) -> int:
    """Every node's flight-recorder files of ``incident`` in one directory, as
    torchfrtrace reads them: a job's ranks are kept on the nodes they ran on."""
    os.makedirs(into, mode=0o700, exist_ok=True)

    def fetch(client: Client) -> list[tuple[str, bytes]]:
        listed = client.get_json("/api/v1/dumps")["dumps"]
        files = []
        for dump in listed:
            rank = str(dump.get("worker"))
            # The rank becomes a file name here: digits only, whatever a node says.
            if dump.get("incident") != incident or dump.get("what") != "fr_trace":
                continue
            if not is_decimal(rank):
                continue
            path = f"/api/v1/dumps/{urllib.parse.quote(str(dump['id']), safe='')}"
            reply = client.request("GET", path)
            if reply.status == 200:
                files.append((rank, reply.body))
        return files

    answers = parallel(nodes.clients, fetch)
    written, failed = 0, list(nodes.failed)
    for client, answer in zip(nodes.clients, answers, strict=True):
        if isinstance(answer, ClientError):
            failed.append(NodeStatus.failed(client.url, answer))
            continue
        for rank, body in answer:
            fd = os.open(
                os.path.join(into, f"{RECORDER_FILE}{rank}"),
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                0o600,
            )
            with os.fdopen(fd, "wb") as out:
                out.write(body)
            written += 1
    answered = len(nodes.clients) + len(nodes.failed) - len(failed)
    print(f"{written} flight-recorder files of {incident} from {answered} nodes in {into}")
    print(f"  python -m torch.distributed.flight_recorder.fr_trace {into}")
    if failed:
        _fail_all(nodes, failed)
        return PARTIAL if written else FAILED
    return OK if written else FAILED


def _dumps(client: Client, dump_id: str | None, as_json: bool) -> int:
    if dump_id:
        reply = client.request("GET", f"/api/v1/dumps/{urllib.parse.quote(dump_id, safe='')}")
        if reply.status != 200:
            raise ClientError(f"{reply.error_text()}: `rankside dumps` lists the ids")
        sys.stdout.buffer.write(reply.body)
        sys.stdout.buffer.flush()
        return OK
    dumps: list[dict[str, Any]] = client.get_json("/api/v1/dumps")["dumps"]
    if as_json:
        _print_json({"dumps": dumps})
        return OK
    if not dumps:
        print(f"no dumps on {client.url}")
        return OK
    rows = [
        [
            present.format_clock(d.get("time")),
            str(d.get("worker")),
            str(d.get("incident")),
            str(d.get("what")),
            present.format_bytes(d.get("size")),
            str(d.get("id")),
        ]
        for d in dumps
    ]
    headers = ["TIME", "WORKER", "INCIDENT", "WHAT", "SIZE", "ID"]
    print("\n".join(present.table(headers, rows, right={4})))
    return OK


# -- events -----------------------------------------------------------------------


def cmd_events(args: argparse.Namespace) -> int:
    with connect(args) as nodes:
        recent = job_events(nodes.clients, args.limit, nodes.failed)
        answered = [n for n in recent.nodes if n.ok]
        if not answered:
            return _fail_all(nodes, recent.nodes)
        for node in recent.nodes:
            if not node.ok:
                print(f"rankside: UNREACHABLE {node.url}: {node.error}", file=sys.stderr)
        # Oldest first, as a log reads; the newest are the last lines on screen.
        for event in reversed(recent.events):
            _print_event(event, nodes.job, args.json)
        status = PARTIAL if len(answered) < len(recent.nodes) else OK
        if not args.follow:
            return status
        # From each node's newest event on, so nothing between the two is lost.
        since = {n.url: n.last_event for n in answered}
        _follow(nodes, since, args.count, args.json)
        return status


def _print_event(event: dict[str, Any], job: bool, as_json: bool) -> None:
    if as_json:
        print(json.dumps(event), flush=True)
    else:
        print(present.event_line(event, job), flush=True)


def _follow(nodes: Nodes, since: dict[str, int | None], count: int | None, as_json: bool) -> None:
    """Print every node's new events as they come; until Ctrl-C or ``count`` of them.

    One thread per node reads its stream and reconnects when it ends, after
    the delay the sidecar's ``retry:`` asked for (else RECONNECT_SECONDS),
    resuming after the last event it saw.
    """
    found: queue.Queue[dict[str, Any]] = queue.Queue()
    done = threading.Event()

    def follow(client: Client) -> None:
        # No id for a node that did not answer the backlog: only new events from it.
        last = since.get(client.url)
        stream = EventStream("" if last is None else str(last))
        said = ""
        while not done.is_set():
            try:
                for event in client.events(stream):
                    said = ""
                    found.put({**event, "node": client.url})
                error = f"the event stream of {client.url} ended"
            except ClientError as exc:
                error = str(exc)
            if done.is_set():
                return
            # Once per outage, not once per retry.
            if error != said:
                print(f"rankside: {error}; reconnecting", file=sys.stderr, flush=True)
                said = error
            done.wait(stream.reconnect_delay(RECONNECT_SECONDS))

    for client in nodes.clients:
        threading.Thread(target=follow, args=(client,), daemon=True).start()
    shown = 0
    try:
        while count is None or shown < count:
            _print_event(found.get(), nodes.job, as_json)
            shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        done.set()


# -- top --------------------------------------------------------------------------


def cmd_top(args: argparse.Namespace) -> int:
    with connect(args, timeout=min(DEFAULT_TIMEOUT, max(args.interval, 2.0))) as nodes:
        iterations = 1 if args.once else args.iterations
        view = top.run(
            lambda: fetch_workers(nodes),
            nodes.where,
            nodes.job,
            args.interval,
            iterations,
            args.json,
        )
    if view is None or iterations is None:
        return OK
    status = view_status(view)
    if status == FAILED:
        return _fail_all(nodes, view.nodes)
    return status


# A diagnosis captures every worker's stacks (py-spy for silent ones) first.
DIAGNOSE_TIMEOUT = 90.0


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Capture the node's (or, with targets, every node's) stacks now and print the
    verdict: culprits, waits, stack groups."""
    with connect(args, timeout=DIAGNOSE_TIMEOUT) as nodes:
        if nodes.job:
            incident = _diagnose_job(nodes)
        else:
            incident = nodes.clients[0].post_json("/api/v1/diagnose")
    if args.json:
        _print_json(incident)
        return OK
    print(incident["summary"])
    for culprit in incident["culprits"]:
        print(
            f"  culprit: rank {culprit['rank']} on {culprit['node']} "
            f"({culprit['evidence']}): {culprit['reason']}"
        )
    for node in incident.get("nodes", []):
        if not node["ok"]:
            print(f"  no answer from {node['url']}: {node['error']}")
    for wait in incident["waits"]:
        desc = f" ({wait['desc']})" if wait["desc"] else ""
        print(f"  waiting: collective #{wait['seq']} of group {wait['group']}{desc}")
    if incident["groups"]:
        print("stacks:")
        for group in incident["groups"]:
            print(f"  {group['ranks_text']}: {group['label']}")
    print(f"incident {incident['id']}: {len(incident['dumps'])} dumps (rankside dumps)")
    return OK


def _diagnose_job(nodes: Nodes) -> dict[str, Any]:
    """Every node captures under one id; the job's verdict, kept on every node.

    The same pure merge as a sidecar's job incident (sidecar/node/jobwide.py),
    over the nodes' answers as this command gathered them.
    """
    kind = IncidentKind.MANUAL
    incident_id = new_incident_id(kind)
    params = [("incident", incident_id), ("kind", str(kind))]
    answers = parallel(nodes.clients, lambda c: c.post_json("/api/v1/diagnose", params))
    captures = [NodeCapture(n.url, error=n.error) for n in nodes.failed] + [
        NodeCapture(c.url, error=str(a)) if isinstance(a, ClientError) else NodeCapture(c.url, a)
        for c, a in zip(nodes.clients, answers, strict=True)
    ]
    first = next((c for c in captures if c.error is None), None)
    if first is None:
        raise ClientError(
            "no node of the job answered: " + "; ".join(f"{c.url}: {c.error}" for c in captures)
        )
    try:
        local = Incident.from_json(first.answer)
    except ValueError as exc:
        raise AnswerError(f"{first.url} did not answer an incident: {exc}") from None
    incident = job_incident(local, [c for c in captures if c is not first], first.url)
    body = json.dumps(incident.to_json(evidence=False)).encode()
    path = f"/api/v1/incidents/{urllib.parse.quote(incident_id, safe='')}"
    parallel(nodes.clients, lambda c: c.request("PUT", path, (), body))
    return incident.to_json()
