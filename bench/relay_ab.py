"""Relay latency of two rankside trees side by side, in one run: is a change faster?

Starts one sidecar and one worker (``relay_worker.py``) from each tree, and
the floor (``floor_app.py``), then times sequential calls of one handler on
each from one ``http.client`` connection apiece, interleaved in blocks as
``bench_relay.py`` does, so that the machine's load hits both alike:

    .venv/bin/python bench/relay_ab.py OLD_TREE NEW_TREE [--handler ping] [--calls 1500]

Run it both ways round: of two identical trees, the second measures a few
per cent slower on the 2-core machine (docs/control.md, "Where the time of a
relayed call goes").
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import httpx
from bench_relay import free_port, percentile, poster, process, side_by_side, succeeds, wait


def succeeds_get(client: httpx.Client, path: str) -> Callable[[], bool]:
    return lambda: client.get(path).status_code == 200


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs=2, type=Path, metavar="TREE")
    parser.add_argument("--handler", default="ping")
    parser.add_argument("--calls", type=int, default=1500)
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="rankside-ab-") as tmp, ExitStack() as stack:
        calls = []
        for i, tree in enumerate(args.trees):
            # -P below: the sidecar is the tree's, not the one in the current directory.
            tree_env = {"PYTHONPATH": str(tree.resolve())}
            sock, port = f"{tmp}/{i}.sock", free_port()
            stack.enter_context(
                process(
                    [py, "-P", "-m", "sidecar", "serve", "--socket", sock,
                     "--listen", f"127.0.0.1:{port}", "--log-level", "warning"],
                    tree_env,
                )
            )  # fmt: skip
            client = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{port}"))
            wait(succeeds_get(client, "/readyz"), 30, f"the sidecar of {tree}")
            worker_env = {**tree_env, "RANKSIDE_SOCKET": sock, "RANK": "0", "WORLD_SIZE": "1"}
            worker = str(tree / "bench" / "relay_worker.py")
            stack.enter_context(process([py, worker, "rankside"], worker_env))
            wait(succeeds_get(client, "/api/v1/workers/0"), 60, "the worker")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            stack.callback(conn.close)
            calls.append(poster(conn, f"/api/v1/workers/0/handlers/{args.handler}"))
        floor_port = free_port()
        floor = str(Path(__file__).resolve().parent / "floor_app.py")
        stack.enter_context(process([py, floor, str(floor_port)]))
        probe = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{floor_port}"))
        wait(succeeds(probe, "/"), 30, "the floor app")
        floor_conn = http.client.HTTPConnection("127.0.0.1", floor_port, timeout=60)
        stack.callback(floor_conn.close)
        first, second, floor_samples = side_by_side(args.calls, [*calls, poster(floor_conn, "/")])
    floor_median = statistics.median(floor_samples)
    print(f"{args.handler}: {args.calls} sequential calls each; floor median {floor_median:.0f} us")
    for tree, samples in zip(args.trees, (first, second), strict=True):
        median = statistics.median(samples)
        print(
            f"  {tree!s:<40} median {median:7.0f} us ({median / floor_median:.2f}x the floor)"
            f"   p99 {percentile(samples, 0.99):7.0f} us"
        )
    ratio = statistics.median(second) / statistics.median(first)
    print(f"  second/first median: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
