"""A client of the sidecar's HTTP API, for one node or a whole job.

Used by the ``rankside`` commands (workers, call, events, dumps, top) and by the
sidecar itself for its job-wide routes. The standard library's urllib is
enough here, so the sidecar gains no runtime dependency for it.

A job is a list of sidecar URLs: given with ``--target``, or found with
``--dns NAME:PORT``, which resolves every address of a Kubernetes headless
Service. Kubernetes' DNS stays the membership: nothing here keeps a list of
nodes of its own. Results from several nodes are merged by global rank, and
nodes that did not answer are reported as such rather than left out.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sidecar.tokens import TokenError, read_token
from sidecar.values import is_decimal

DEFAULT_URL = "http://127.0.0.1:9478"
DEFAULT_TIMEOUT = 10.0
# One thread per node asked; past this many nodes they queue.
MAX_PARALLEL = 32

T = TypeVar("T")
Item = TypeVar("Item")


class ClientError(Exception):
    """A request that failed; the message says what went wrong and what to do."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class HttpReply:
    """One HTTP answer, whatever its status."""

    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error_text(self) -> str:
        """The sidecar's ``{"error": ...}`` message, or the body as text."""
        try:
            message = self.json().get("error")
        except (ValueError, AttributeError):
            message = None
        if isinstance(message, str):
            return message
        return self.body[:500].decode(errors="replace").strip() or f"HTTP {self.status}"


class Client:
    """One sidecar at ``url``; ``token`` goes in an Authorization header, never in a URL."""

    def __init__(
        self, url: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def _request(
        self,
        method: str,
        path: str,
        params: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> urllib.request.Request:
        query = f"?{urllib.parse.urlencode(list(params))}" if params else ""
        request = urllib.request.Request(
            self.url + path + query, data=body, method=method, headers=headers or {}
        )
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        return request

    def request(
        self,
        method: str,
        path: str,
        params: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
        timeout: float | None = None,
    ) -> HttpReply:
        """Any answer but 401 is returned; no answer, or a 401, raises ClientError."""
        request = self._request(method, path, params, body)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                return HttpReply(
                    response.status, response.headers.get("content-type", ""), response.read()
                )
        except urllib.error.HTTPError as exc:
            reply = HttpReply(exc.code, exc.headers.get("content-type", ""), exc.read())
            if exc.code == 401:
                raise self._auth_error(exc.headers.get("www-authenticate", "")) from None
            return reply
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise self._unreachable(exc, timeout or self.timeout) from None

    def get_json(self, path: str, params: Sequence[tuple[str, str]] = ()) -> Any:
        """GET ``path`` and decode its JSON; anything but 200 raises ClientError."""
        reply = self.request("GET", path, params)
        if reply.status != 200:
            raise ClientError(f"{self.url}{path}: HTTP {reply.status}: {reply.error_text()}")
        try:
            return reply.json()
        except ValueError:
            raise ClientError(f"{self.url}{path} did not answer JSON: is it a sidecar?") from None

    def events(self, since: int | None = None) -> Iterator[dict[str, Any]]:
        """Follow ``/api/v1/events/stream``: each event as it happens, until the stream ends.

        ``since`` replays the events after that id first, as Last-Event-ID does.
        """
        headers = {"Accept": "text/event-stream"}
        if since is not None:
            headers["Last-Event-ID"] = str(since)
        request = self._request("GET", "/api/v1/events/stream", headers=headers)
        try:
            # The stream sends a keep-alive every 15 s; a read timeout well past
            # that means the connection is gone.
            response = urllib.request.urlopen(request, timeout=max(self.timeout, 45.0))
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise self._auth_error(exc.headers.get("www-authenticate", "")) from None
            raise ClientError(f"{self.url}/api/v1/events/stream: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise self._unreachable(exc, self.timeout) from None
        with response:
            data: list[str] = []
            try:
                for raw in response:
                    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                    if line.startswith("data:"):
                        data.append(line[5:].lstrip())
                    elif not line and data:
                        event: dict[str, Any] = json.loads("\n".join(data))
                        data = []
                        yield event
            except (OSError, ValueError) as exc:
                raise self._unreachable(exc, self.timeout) from None

    def _auth_error(self, challenge: str) -> ClientError:
        if "invalid_token" in challenge:
            return ClientError(
                f"{self.url} refused the token: check --token, RANKSIDE_TOKEN or "
                "RANKSIDE_TOKEN_FILE against the file the sidecar reads (--token-file)",
                401,
            )
        return ClientError(
            f"{self.url} requires a token: pass --token, or set RANKSIDE_TOKEN or "
            "RANKSIDE_TOKEN_FILE",
            401,
        )

    def _unreachable(self, exc: BaseException, timeout: float) -> ClientError:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError | socket.timeout):
            return ClientError(f"no answer from {self.url} within {timeout:g} s")
        return ClientError(f"cannot reach {self.url}: {reason}")


# -- targets ------------------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """Where the sidecars of a job are: URLs, and headless Service names to resolve."""

    urls: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.urls or self.dns)

    def resolve(self) -> tuple[list[str], list[NodeStatus]]:
        """The URLs to ask, and a failed node for each name that did not resolve."""
        urls = list(self.urls)
        failed: list[NodeStatus] = []
        for name in self.dns:
            try:
                urls.extend(resolve_dns(name))
            except ClientError as exc:
                failed.append(NodeStatus(f"dns:{name}", ok=False, error=str(exc)))
        return list(dict.fromkeys(urls)), failed


def split_host_port(spec: str) -> tuple[str, int]:
    """``NAME:PORT`` -> (NAME, PORT); ValueError when it is not that."""
    host, sep, port = spec.rpartition(":")
    if not sep or not host or not is_decimal(port) or not 0 < int(port) < 65536:
        raise ValueError(f"{spec!r} is not NAME:PORT")
    return host.strip("[]"), int(port)


def url_of(address: str, port: int) -> str:
    """``http://ADDRESS:PORT``, with IPv6 addresses in brackets."""
    try:
        is_v6 = ipaddress.ip_address(address).version == 6
    except ValueError:
        is_v6 = False
    return f"http://[{address}]:{port}" if is_v6 else f"http://{address}:{port}"


def resolve_dns(spec: str) -> list[str]:
    """Every address of ``NAME:PORT`` as a URL: a headless Service has one per ready pod."""
    try:
        host, port = split_host_port(spec)
    except ValueError as exc:
        raise ClientError(f"--dns {exc}") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ClientError(
            f"cannot resolve {host}: {exc}. Is it the name of the job's headless Service "
            "(clusterIP: None), and is this inside the cluster?"
        ) from None
    addresses = dict.fromkeys(str(info[4][0]) for info in infos)
    return sorted((url_of(a, port) for a in addresses), key=_address_order)


def _address_order(url: str) -> tuple[int, str]:
    return (url.startswith("http://["), url)


def add_target_options(parser: argparse.ArgumentParser) -> None:
    """``--target`` and ``--dns``: the sidecars of a job, for job-wide views."""
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="URL",
        help="a sidecar of the job (repeatable); results are merged by global rank",
    )
    parser.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="NAME:PORT",
        help="every address of this name is a sidecar of the job (a Kubernetes headless "
        "Service; repeatable)",
    )


def targets_from_args(args: argparse.Namespace) -> Targets:
    for spec in args.dns:
        try:
            split_host_port(spec)
        except ValueError as exc:
            raise SystemExit(f"rankside: --dns {exc}") from None
    for url in args.target:
        if not url.startswith(("http://", "https://")):
            raise SystemExit(f"rankside: --target {url!r} is not an http:// or https:// URL")
    return Targets(tuple(url.rstrip("/") for url in args.target), tuple(args.dns))


# -- job-wide views -----------------------------------------------------------------


@dataclass
class NodeStatus:
    """One sidecar of the job, and whether it answered."""

    url: str
    ok: bool
    error: str | None = None
    workers: int = 0
    # The id of the node's newest event, when its events were read (0: none yet).
    last_event: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "ok": self.ok, "error": self.error, "workers": self.workers}


@dataclass
class JobWorkers:
    """Every worker of the job, merged by global rank, and every node asked."""

    time: float
    nodes: list[NodeStatus]
    workers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def unreachable(self) -> list[NodeStatus]:
        return [n for n in self.nodes if not n.ok]

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "nodes": [n.to_json() for n in self.nodes],
            "workers": self.workers,
        }


def parallel(items: Sequence[Item], work: Callable[[Item], T]) -> list[T | ClientError]:
    """``work(item)`` for every item at once (one node each), in order.

    A ClientError raised by ``work`` is that item's result, so that one node
    that does not answer does not hide the others' answers.
    """

    def one(item: Item) -> T | ClientError:
        try:
            return work(item)
        except ClientError as exc:
            return exc

    if len(items) <= 1:
        return [one(item) for item in items]
    with ThreadPoolExecutor(min(len(items), MAX_PARALLEL)) as pool:
        return list(pool.map(one, items))


def rank_order(worker: dict[str, Any]) -> tuple[int, int, str, str]:
    """Global rank first; workers without one (not under torchrun) after, by node."""
    rank = worker.get("rank")
    if isinstance(rank, int):
        return (0, rank, str(worker.get("node", "")), str(worker.get("key")))
    return (1, 0, str(worker.get("node", "")), str(worker.get("key")))


def job_workers(
    clients: Sequence[Client], failed: Sequence[NodeStatus] = (), now: float | None = None
) -> JobWorkers:
    """Ask every node for its workers; each worker gets ``node`` and ``progress_age``.

    The age of the last progress is computed against each node's own clock, so
    clocks that disagree between nodes (or with the reader) do not skew it.
    """
    answers = parallel(clients, lambda c: c.get_json("/api/v1/workers"))
    nodes = list(failed)
    merged: list[dict[str, Any]] = []
    for client, answer in zip(clients, answers, strict=True):
        if isinstance(answer, ClientError):
            nodes.append(NodeStatus(client.url, ok=False, error=str(answer)))
            continue
        node_time = answer.get("time")
        workers = answer.get("workers", [])
        nodes.append(NodeStatus(client.url, ok=True, workers=len(workers)))
        for worker in workers:
            progress = worker.get("progress_time")
            age = None
            if isinstance(progress, int | float) and isinstance(node_time, int | float):
                age = max(0.0, node_time - progress)
            merged.append({**worker, "node": client.url, "progress_age": age})
    merged.sort(key=rank_order)
    return JobWorkers(time.time() if now is None else now, nodes, merged)


def job_events(
    clients: Sequence[Client], limit: int, failed: Sequence[NodeStatus] = ()
) -> tuple[list[dict[str, Any]], list[NodeStatus]]:
    """The newest ``limit`` events of every node, merged by time, newest first."""
    answers = parallel(
        clients, lambda c: c.get_json("/api/v1/events", [("limit", str(limit))])["events"]
    )
    nodes = list(failed)
    merged: list[dict[str, Any]] = []
    for client, answer in zip(clients, answers, strict=True):
        if isinstance(answer, ClientError):
            nodes.append(NodeStatus(client.url, ok=False, error=str(answer)))
            continue
        newest = max((int(e["id"]) for e in answer), default=0)
        nodes.append(NodeStatus(client.url, ok=True, last_event=newest))
        merged.extend({**event, "node": client.url} for event in answer)
    merged.sort(key=lambda e: (e.get("time") or 0, e.get("id") or 0), reverse=True)
    return merged[:limit], nodes


@dataclass
class JobCall:
    """A handler called on many workers across nodes: each rank's answer and each node."""

    handler: str
    nodes: list[NodeStatus]
    ranks: dict[str, dict[str, Any]]
    missing: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = sum(1 for r in self.ranks.values() if r.get("status") == 200)
        return {
            "workers": len(self.ranks),
            "ok": ok,
            "failed": len(self.ranks) - ok,
            "missing": self.missing,
            "unreachable_nodes": sum(1 for n in self.nodes if not n.ok),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "handler": self.handler,
            "summary": self.summary(),
            "nodes": [n.to_json() for n in self.nodes],
            "ranks": self.ranks,
        }


def job_call(
    clients: Sequence[Client],
    handler: str,
    ranks: Sequence[int] | None,
    params: Sequence[tuple[str, str]],
    timeout: float | None,
    failed: Sequence[NodeStatus] = (),
) -> JobCall:
    """Call ``handler`` on ``ranks`` (every worker when None) through each node's fan-out.

    With ranks named, each node is first asked which of them it runs, so that a
    rank on another node is not reported as missing by this one.
    """
    missing: list[int] = []
    if ranks is None:
        plan: list[tuple[Client, str | None]] = [(c, None) for c in clients]
        nodes = {c.url: NodeStatus(c.url, ok=True) for c in clients}
    else:
        listing = job_workers(clients)
        nodes = {n.url: n for n in listing.nodes}
        owners: dict[str, list[int]] = {}
        for rank in ranks:
            node = owner_of(listing.workers, str(rank))
            if node is None:
                missing.append(rank)
            else:
                owners.setdefault(node, []).append(rank)
        plan = [(c, ",".join(map(str, owners[c.url]))) for c in clients if c.url in owners]

    query = list(params)
    if timeout is not None:
        query.append(("timeout", f"{timeout:g}"))
    # The HTTP read waits for the slowest worker's deadline, and a little more.
    wait = (timeout or 30.0) + 10.0
    path = f"/api/v1/handlers/{urllib.parse.quote(handler, safe='')}"

    def call(item: tuple[Client, str | None]) -> dict[str, Any]:
        client, spec = item
        selection = [("ranks", spec)] if spec is not None else []
        reply = client.request("POST", path, [*selection, *query], b"", wait)
        if reply.status != 200:
            raise ClientError(f"{client.url}: HTTP {reply.status}: {reply.error_text()}")
        try:
            answer: dict[str, Any] = reply.json()["ranks"]
        except (ValueError, KeyError, TypeError):
            raise ClientError(
                f"{client.url}{path} did not answer a fan-out: is it a sidecar?"
            ) from None
        return answer

    results: dict[str, dict[str, Any]] = {}
    for (client, _), answer in zip(plan, parallel(plan, call), strict=True):
        if isinstance(answer, ClientError):
            nodes[client.url] = NodeStatus(client.url, ok=False, error=str(answer))
            continue
        nodes[client.url].workers = len(answer)
        for key, result in answer.items():
            results[key] = {**result, "node": client.url, "key": key, "rank": _int(key)}
    ordered = sorted(results.values(), key=rank_order)
    return JobCall(handler, [*failed, *nodes.values()], {r["key"]: r for r in ordered}, missing)


def owner_of(workers: Sequence[dict[str, Any]], key: str) -> str | None:
    """The node running worker ``key`` (a global rank); one where it ended if none runs it."""
    holders = [w for w in workers if w.get("key") == key]
    running = [w for w in holders if w.get("state") == "running"]
    chosen = running or holders
    return str(chosen[0]["node"]) if chosen else None


def _int(text: str) -> int | None:
    return int(text) if is_decimal(text) else None


# -- tokens -------------------------------------------------------------------------


def token_from(explicit: str | None, path: str | None) -> str | None:
    """The token to send: ``--token``/RANKSIDE_TOKEN, else the token file's, read as
    the sidecar reads its own (sidecar/http/access.py)."""
    if explicit:
        return explicit.strip()
    if path:
        try:
            return read_token(path, warn_if_shared=False)
        except TokenError as exc:
            raise ClientError(str(exc)) from None
    return None


def env_default(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default
