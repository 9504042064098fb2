"""Job-wide diagnose across 32 sidecars on one machine: its time, and the bytes each node sends.

Starts ``--nodes`` real sidecars (``python -m sidecar serve``, each on its own
socket and port, ``--node-name node-NN``), each with ``--ranks-per-node``
worker processes (bench/job_worker.py: worker_hooks with a distinct RANK, and
the flight-recorder positions of a hung job, rank 63 one collective behind).
The first sidecar has every other one as a ``--target``. Then:

- ``POST /api/v1/job/diagnose`` on the first sidecar against its own
  ``POST /api/v1/diagnose`` (the node's capture alone), ``--runs`` of each,
  interleaved (the order alternating), medians and p90s, and their ratio;
- ``rankside diagnose --target URL`` x nodes, the command line's job path
  (when this ``rankside`` takes ``--target`` for diagnose);
- the bytes each node sends: every node's capture answer (the JSON it sends
  the asker), the verdict the asker sends each node (``PUT
  /api/v1/incidents/{id}``, encoded as ``JobPeers.publish`` encodes it), and
  the job incident JSON; and one PUT's time;
- the deadlines: the first sidecar restarted with 4 of its targets replaced
  by closed ports, then with one more target that accepts and never answers;
- the merge at scale, in this process: ``job_incident`` over synthetic node
  answers shaped like the measured one, for 32 x 2 up to 1,000 x 8 ranks
  (and, with ``--with-dp-group``, 1,000 x 8 with a listed 1,000-rank
  data-parallel group: several GiB of this process's memory).

    .venv/bin/python bench/bench_job_diagnose.py [--runs 15] [--json FILE]

Every sidecar and worker shares this machine's cores: a job diagnose here
captures 32 nodes on 2 cores, where a real job's nodes capture each on its own.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_relay import free_port, process, row, wait

from sidecar.client.http import KEEPALIVE_EXPIRY
from sidecar.config import Config
from sidecar.http.job import NODE_TIMEOUT
from sidecar.node.incidents import PYSPY_TIMEOUT, Incident
from sidecar.node.jobwide import NodeCapture, job_incident
from worker_hooks.collectives import MAX_LISTED_RANKS

WORKER = Path(__file__).resolve().parent / "job_worker.py"
DUMP_TIMEOUT = 5.0  # the sidecar's default --dump-timeout
JOB = "/api/v1/job/diagnose"
NODE = "/api/v1/diagnose"
UNREACHABLE = 4


class Job:
    """The bench's sidecars and workers, in ``tmp``; node 0 may be restarted with other targets."""

    def __init__(self, stack: ExitStack, tmp: Path, nodes: int, per_node: int) -> None:
        self.stack = stack
        self.tmp = tmp
        self.nodes = nodes
        self.per_node = per_node
        self.ports = [free_port() for _ in range(nodes)]
        self.clients = [stack.enter_context(self.client(i)) for i in range(nodes)]

    def client(self, node: int) -> httpx.Client:
        # Idle connections dropped before the sidecar closes them (see Peers).
        limits = httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY)
        return httpx.Client(base_url=self.url(node), timeout=120, limits=limits)

    def url(self, node: int) -> str:
        return f"http://127.0.0.1:{self.ports[node]}"

    def socket(self, node: int) -> str:
        directory = self.tmp / f"node-{node:02d}"
        directory.mkdir(exist_ok=True)
        return str(directory / "rankside.sock")

    @contextmanager
    def sidecar(self, node: int, targets: list[str]) -> Iterator[None]:
        cmd = [
            sys.executable,
            "-m",
            "sidecar",
            "serve",
            "--socket",
            self.socket(node),
            "--listen",
            f"127.0.0.1:{self.ports[node]}",
            "--node-name",
            f"node-{node:02d}",
            "--log-level",
            "error",
        ]
        for target in targets:
            cmd += ["--target", target]
        with process(cmd):
            client = self.clients[node]
            wait(lambda: client.get("/readyz").status_code == 200, 120, f"node-{node:02d}")
            yield

    def start_workers(self) -> None:
        world = self.nodes * self.per_node
        for node in range(self.nodes):
            for local in range(self.per_node):
                rank = node * self.per_node + local
                env = {
                    "RANKSIDE_SOCKET": self.socket(node),
                    "RANK": str(rank),
                    "LOCAL_RANK": str(local),
                    "WORLD_SIZE": str(world),
                }
                self.stack.enter_context(process([sys.executable, str(WORKER)], env))

    def wait_workers(self, node: int) -> None:
        client = self.clients[node]

        def ready() -> bool:
            workers = client.get("/api/v1/workers").json()["workers"]
            reporting = [w for w in workers if w["state"] == "running" and w.get("collectives")]
            return len(reporting) == self.per_node

        wait(ready, 180, f"the workers of node-{node:02d}")

    def restart_first(self, targets: list[str]) -> ExitStack:
        """Node 0 on a fresh port with ``targets``, its workers reconnected; close to stop it."""
        self.ports[0] = free_port()
        self.clients[0] = self.stack.enter_context(self.client(0))
        restarted = ExitStack()
        restarted.enter_context(self.sidecar(0, targets))
        self.wait_workers(0)
        return restarted


def timed_post(client: httpx.Client, path: str) -> tuple[float, bytes]:
    """Seconds one POST took, and its body; anything but 200 ends the bench."""
    started = time.perf_counter()
    response = client.post(path)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise SystemExit(f"bench: {path}: HTTP {response.status_code} {response.text[:300]}")
    return elapsed, response.content


def all_at_once(
    pool: ThreadPoolExecutor, clients: list[httpx.Client], call: Callable[[httpx.Client], object]
) -> tuple[float, bytes]:
    """Seconds until ``call`` returned for every client, all started at once."""
    started = time.perf_counter()
    list(pool.map(call, clients))
    return time.perf_counter() - started, b""


def put_verdict(body: bytes) -> Callable[[httpx.Client], object]:
    path = f"/api/v1/incidents/{json.loads(body)['id']}"

    def put(client: httpx.Client) -> None:
        response = client.put(path, content=body)
        if response.status_code != 200:
            raise SystemExit(f"bench: PUT {path}: HTTP {response.status_code} {response.text}")

    return put


def culprit_ranks(incident: dict[str, Any]) -> list[int]:
    return [c["rank"] for c in incident["culprits"]]


def check_job(incident: dict[str, Any], nodes: int, hung: int) -> None:
    answered = sum(n["ok"] for n in incident["nodes"])
    if answered != nodes or culprit_ranks(incident) != [hung]:
        raise SystemExit(
            f"bench: the job verdict is not the expected one ({answered} of {nodes} nodes "
            f"answered): {incident['summary']}"
        )


def interleaved(
    runs: int, cases: dict[str, Callable[[], tuple[float, bytes]]]
) -> tuple[dict[str, list[float]], dict[str, bytes]]:
    """``runs`` timings of each case, in an order that alternates, after one warm-up each."""
    for case in cases.values():
        case()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    last: dict[str, bytes] = {}
    names = list(cases)
    for run in range(runs):
        for name in names if run % 2 == 0 else reversed(names):
            elapsed, body = cases[name]()
            samples[name].append(elapsed * 1000)
            last[name] = body
    return samples, last


def kib(size: float) -> str:
    return f"{size / 1024:,.1f} KiB"


def measure_cli(job: Job, runs: int) -> dict[str, Any]:
    """``rankside diagnose --target ...`` over every node, timed with the interpreter's start."""
    cmd = [sys.executable, "-m", "sidecar", "diagnose", "--json"]
    for node in range(job.nodes):
        cmd += ["--target", job.url(node)]
    samples: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, timeout=300, check=False)
        samples.append((time.perf_counter() - started) * 1000)
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            # The usage error repeats every URL: its start says enough.
            why = lines[-1][:100] if lines else ""
            print(f"  rankside diagnose --target x{job.nodes}: exit {done.returncode}: {why}")
            return {"available": False, "exit": done.returncode, "error": why}
    incident = json.loads(done.stdout)
    print(f"  rankside diagnose --target x{job.nodes} (scope {incident.get('scope')}):")
    return {"available": True, "scope": incident.get("scope"), **row("CLI", samples, "ms", 0.9)}


def measure_sizes(job: Job, job_body: bytes, runs: int) -> dict[str, Any]:
    """What each node sends the asker, what the asker sends each node, and a PUT's time."""
    answers = [timed_post(client, NODE) for client in job.clients]
    sizes = [len(body) for _, body in answers]
    incident = json.loads(job_body)
    # JobPeers.publish encodes with json.dumps' default separators.
    put_body = json.dumps(incident).encode()
    path = f"/api/v1/incidents/{incident['id']}"
    put_ms: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        response = job.clients[1].put(path, content=put_body)
        put_ms.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200:
            raise SystemExit(f"bench: PUT {path}: HTTP {response.status_code} {response.text}")
    print(
        f"bytes: a node's capture answer median {kib(statistics.median(sizes))} "
        f"(min {kib(min(sizes))}, max {kib(max(sizes))}); the verdict PUT to each node "
        f"{kib(len(put_body))}; the job incident JSON {kib(len(job_body))}"
    )
    print(f"each node alone, POST {NODE} one after another:")
    return {
        "capture_answer_bytes": {
            "median": statistics.median(sizes),
            "min": min(sizes),
            "max": max(sizes),
        },
        "put_body_bytes": len(put_body),
        "job_incident_bytes": len(job_body),
        "node_capture_alone_ms": row("capture", [t * 1000 for t, _ in answers], "ms", 0.9),
        "put_ms": row(f"PUT of the verdict to node-01, {runs}x", put_ms, "ms", 0.9),
        "template": json.loads(answers[1][1]),
    }


def measure_unreachable(job: Job, peers: list[str]) -> dict[str, Any]:
    """Node 0 with 4 of its targets replaced by closed ports."""
    closed = [f"http://127.0.0.1:{free_port()}" for _ in range(UNREACHABLE)]
    with job.restart_first(closed + peers[UNREACHABLE:]):
        seconds, body = timed_post(job.clients[0], JOB)
    incident = json.loads(body)
    down = [n for n in incident["nodes"] if not n["ok"]]
    print(
        f"{UNREACHABLE} of {len(peers)} targets closed ports: job diagnose {seconds * 1000:.0f} "
        f"ms, {len(down)} nodes listed as not answering, culprits {culprit_ranks(incident)}"
    )
    return {
        "ms": seconds * 1000,
        "down": len(down),
        "culprits": culprit_ranks(incident),
        "error": down[0]["error"] if down else None,
    }


def measure_silent(job: Job, peers: list[str]) -> dict[str, Any]:
    """Node 0 with one more target: a socket that accepts (its backlog) and never answers."""
    wait_s = DUMP_TIMEOUT + PYSPY_TIMEOUT + 5.0
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with job.restart_first([*peers, url]):
            seconds, body = timed_post(job.clients[0], JOB)
    incident = json.loads(body)
    down = [n for n in incident["nodes"] if not n["ok"]]
    print(
        f"one target accepts and never answers: job diagnose {seconds:.1f} s (capture wait "
        f"{wait_s:g} s, then the verdict's PUT to it waits {NODE_TIMEOUT:g} s); "
        f"culprits {culprit_ranks(incident)}; {down[0]['error'] if down else 'none down'}"
    )
    return {
        "seconds": seconds,
        "capture_wait_s": wait_s,
        "publish_timeout_s": NODE_TIMEOUT,
        "culprits": culprit_ranks(incident),
        "error": down[0]["error"] if down else None,
    }


# -- the merge at scale, in this process --------------------------------------------------


def synthetic_answer(
    template: dict[str, Any], node: int, per_node: int, nodes: int, dp_group: bool
) -> dict[str, Any]:
    """Node ``node``'s capture answer in a job of ``nodes`` x ``per_node`` ranks, shaped
    like ``template`` (a measured answer): the last rank of the job one collective behind."""
    world = nodes * per_node
    view = template["ranks"][0]
    default = view["collectives"]["0"]
    seq = default["enqueued"]
    ranks = list(range(node * per_node, (node + 1) * per_node))
    name = f"node-{node:04d}"

    def listed(members: list[int]) -> list[int]:
        # As the worker sends them: a group too large is sent with no rank list.
        return members if len(members) <= MAX_LISTED_RANKS else []

    views = []
    for rank in ranks:
        groups = {
            "0": {
                **default,
                "ranks": listed(list(range(world))),
                "enqueued": seq - 1 if rank == world - 1 else seq,
            },
            str(1 + node): {
                **default,
                "desc": "tp",
                "ranks": ranks,
                "enqueued": 40,
                "completed": 40,
            },
        }
        if dp_group:
            members = list(range(rank % per_node, world, per_node))
            groups[str(1 + nodes + rank % per_node)] = {
                **default,
                "desc": "dp",
                "ranks": listed(members),
            }
        views.append({**view, "rank": rank, "node": name, "collectives": groups})
    group = template["groups"][0]
    dumps = template["dumps"]
    return {
        **template,
        "node": name,
        "ranks": views,
        "collectives": {str(v["rank"]): v["collectives"] for v in views},
        "groups": [{**group, "ranks": ranks, "ranks_text": f"{ranks[0]}-{ranks[-1]}"}],
        "dumps": [dumps[i % len(dumps)] for i in range(per_node)],
    }


def merge_at_scale(
    template: dict[str, Any], nodes: int, per_node: int, dp_group: bool, receiver: httpx.Client
) -> dict[str, Any]:
    """The asker's work for ``nodes`` answers: decode, merge, encode the verdict; and one
    receiver's decoding of it. Seconds of this process's CPU, one run each; then the
    verdict PUT to ``receiver``, a real sidecar, for the status it answers."""
    blobs = [
        json.dumps(synthetic_answer(template, n, per_node, nodes, dp_group), separators=(",", ":"))
        for n in range(nodes)
    ]
    local = Incident.from_json(json.loads(blobs[0]))
    started = time.perf_counter()
    captures = [NodeCapture(f"node-{n}", answer=json.loads(b)) for n, b in enumerate(blobs[1:])]
    decoded = time.perf_counter()
    incident = job_incident(local, captures)
    merged = time.perf_counter()
    body = json.dumps(incident.to_json()).encode()
    encoded = time.perf_counter()
    Incident.from_json(json.loads(body))
    received = time.perf_counter()
    status = receiver.put(f"/api/v1/incidents/{incident.id}", content=body).status_code
    culprits = [c.rank for c in incident.verdict.culprits]
    ranks = nodes * per_node
    label = f"{nodes} nodes x {per_node} ranks{' + dp group' if dp_group else ''}"
    print(
        f"  {label:<34} answer {kib(statistics.median(len(b) for b in blobs)):>12}, verdict "
        f"{kib(len(body)):>13}; decode {decoded - started:6.2f} s, merge "
        f"{merged - decoded:6.2f} s, encode {encoded - merged:6.2f} s, a receiver's "
        f"decode {received - encoded:6.2f} s; culprits {culprits}; PUT: HTTP {status}"
    )
    return {
        "nodes": nodes,
        "ranks_per_node": per_node,
        "dp_group": dp_group,
        "answer_bytes": statistics.median(len(b) for b in blobs),
        "verdict_bytes": len(body),
        "decode_s": decoded - started,
        "merge_s": merged - decoded,
        "encode_s": encoded - merged,
        "receiver_decode_s": received - encoded,
        "culprit_ok": culprits == [ranks - 1],
        "put_status": status,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--cli-runs", type=int, default=5)
    parser.add_argument("--no-faults", action="store_true", help="skip the deadline runs")
    parser.add_argument("--no-scale", action="store_true", help="skip the merge at scale")
    parser.add_argument(
        "--with-dp-group",
        action="store_true",
        help="also merge 1,000 x 8 ranks with a listed 1,000-rank group (a 98 MiB verdict: "
        "several GiB of memory, minutes of CPU)",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    results: dict[str, Any] = {"nodes": args.nodes, "ranks": args.nodes * args.ranks_per_node}
    hung = args.nodes * args.ranks_per_node - 1

    with tempfile.TemporaryDirectory(prefix="rankside-bench-") as tmp, ExitStack() as stack:
        job = Job(stack, Path(tmp), args.nodes, args.ranks_per_node)
        peers = [job.url(n) for n in range(1, args.nodes)]
        started = time.monotonic()
        for node in range(1, args.nodes):
            stack.enter_context(job.sidecar(node, []))
        first = ExitStack()
        first.enter_context(job.sidecar(0, peers))
        job.start_workers()
        for node in range(args.nodes):
            job.wait_workers(node)
        print(
            f"{args.nodes} sidecars and {results['ranks']} workers up in "
            f"{time.monotonic() - started:.0f} s"
        )

        verdicts: list[bytes] = []

        def job_case() -> tuple[float, bytes]:
            seconds, body = timed_post(job.clients[0], JOB)
            check_job(json.loads(body), args.nodes, hung)
            verdicts.append(body)
            return seconds, body

        # The job diagnose's two phases, done by this process as node-00 does
        # them: every other node's capture at once, then the verdict to each.
        pool = stack.enter_context(ThreadPoolExecutor(args.nodes))
        others = job.clients[1:]
        verdicts.append(job_case()[1])
        cases = {
            "job": job_case,
            "node": lambda: timed_post(job.clients[0], NODE),
            "capture": lambda: all_at_once(pool, others, lambda c: timed_post(c, NODE)),
            "publish": lambda: all_at_once(pool, others, put_verdict(verdicts[-1])),
        }
        samples, last = interleaved(args.runs, cases)
        print(f"{args.runs} runs each, interleaved, on node-00:")
        results["job_diagnose_ms"] = row(
            f"POST {JOB} ({args.nodes} nodes)", samples["job"], "ms", 0.9
        )
        results["node_diagnose_ms"] = row(
            f"POST {NODE} (node-00 alone)", samples["node"], "ms", 0.9
        )
        results["capture_phase_ms"] = row(
            f"POST {NODE} on the {len(others)} others at once", samples["capture"], "ms", 0.9
        )
        results["publish_phase_ms"] = row(
            f"PUT the verdict to the {len(others)} others at once", samples["publish"], "ms", 0.9
        )
        ratio = results["job_diagnose_ms"]["median"] / results["node_diagnose_ms"]["median"]
        results["ratio_median"] = ratio
        print(f"  median ratio job/node: {ratio:.1f}x")
        print(f"  verdict: {json.loads(last['job'])['summary']}")
        results["cli"] = measure_cli(job, args.cli_runs)
        sizes = measure_sizes(job, last["job"], args.runs)
        template = sizes.pop("template")
        results["sizes"] = sizes
        first.close()
        if not args.no_faults:
            results["unreachable"] = measure_unreachable(job, peers)
            results["silent"] = measure_silent(job, peers)
        if not args.no_scale:
            print(
                "the asker's merge at scale (synthetic answers shaped like node-01's, one "
                f"run; the verdict then PUT to node-01, which takes bodies of at most "
                f"{kib(Config(socket_path='').max_body)}, --max-body):"
            )
            results["scale"] = [
                merge_at_scale(template, nodes, per_node, dp, job.clients[1])
                for nodes, per_node, dp in [
                    (32, 2, False),
                    (32, 8, False),
                    (64, 8, False),
                    (128, 8, False),
                    (1000, 8, False),
                    *([(1000, 8, True)] if args.with_dp_group else []),
                ]
            ]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
