"""The command that tests run under ``rankside run``: ``run_child.py MODE OUT [CODE]``.

``check``: report what a command sees (the socket, the sidecar's API with and
without the token, itself as a worker) to OUT and exit with CODE.
``signals``: write "ready" to OUT, then wait for SIGINT or SIGTERM; on the first,
wait a little for duplicates, note whether the sidecar still answers, and
exit with CODE.
"""

import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request

import worker_hooks

URL = os.environ["RUN_TEST_URL"]
TOKEN = os.environ.get("RUN_TEST_TOKEN", "")


def get(path: str, token: str = "") -> int:
    request = urllib.request.Request(URL + path)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def workers() -> list[dict[str, object]]:
    request = urllib.request.Request(URL + "/api/v1/workers")
    request.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(request, timeout=5) as response:
        return list(json.load(response)["workers"])


def check(out: str, code: int) -> None:
    report: dict[str, object] = {"socket": os.environ.get("RANKSIDE_SOCKET")}
    report["socket_exists"] = os.path.exists(str(report["socket"]))
    report["readyz"] = get("/readyz")
    report["workers_without_token"] = get("/api/v1/workers")
    with worker_hooks.worker_main():
        for _ in range(3):
            worker_hooks.step()
            time.sleep(0.05)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            mine = [w for w in workers() if w["pid"] == os.getpid()]
            if mine:
                report["listed"] = mine[0]["state"]
                break
            time.sleep(0.05)
    with open(out, "w") as f:
        json.dump(report, f)
    sys.exit(code)


def signals(out: str, code: int) -> None:
    received: list[str] = []

    def note(signo: int, frame: object) -> None:
        received.append(signal.Signals(signo).name)

    signal.signal(signal.SIGINT, note)
    signal.signal(signal.SIGTERM, note)
    with open(out, "w") as f:
        f.write("ready\n")
    while not received:
        time.sleep(0.01)
    time.sleep(0.5)  # a second copy of the signal would arrive now
    report = {"received": received, "sidecar_readyz": get("/readyz")}
    with open(out, "w") as f:
        json.dump(report, f)
    sys.exit(code)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    exit_code = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    {"check": check, "signals": signals}[mode](out, exit_code)
