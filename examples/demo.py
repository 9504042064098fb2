"""``make demo``: a sidecar and four demo workers on this machine, until stopped.

However it is stopped (Ctrl-C, SIGTERM or SIGHUP to it or to ``make``, a
closed terminal), it stops the workers first and then the sidecar, and leaves
no process and no socket behind. If its port is taken it says so and exits 1
without starting anything.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from sidecar.cli.run import die_with_parent, is_ready
from sidecar.values import host_and_port

HERE = Path(__file__).resolve().parent
WORKERS = 4


# The signals that asked the demo to stop. A flag, not an exception: one
# raised at an arbitrary point could cut the clean-up short.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
stop_requested: list[int] = []


def request_stop(signum: int, frame: FrameType | None) -> None:
    stop_requested.append(signum)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def wait_ready(sidecar: subprocess.Popen[bytes], url: str, sock: str, timeout: float = 15) -> None:
    """Until *our* sidecar answers, as ``rankside run`` waits: by its pid in /readyz, so
    another sidecar that took the port meanwhile is not mistaken for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop_requested:
        if sidecar.poll() is not None:
            raise SystemExit(f"rankside demo: the sidecar exited with status {sidecar.returncode}")
        if is_ready(url + "/readyz", sock, None, sidecar.pid):
            return
        time.sleep(0.1)
    if not stop_requested:
        raise SystemExit(f"rankside demo: the sidecar did not become ready at {url}")


def child(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    # Its own session: a terminal's Ctrl-C reaches only this script, which
    # stops the workers before the sidecar, each exactly once. And it goes if
    # this script is killed outright.
    return subprocess.Popen(
        argv, env=env, start_new_session=True, preexec_fn=lambda: die_with_parent(signal.SIGTERM)
    )


def main() -> int:
    listen = os.environ.get("RANKSIDE_LISTEN", "127.0.0.1:9478")
    host, port = host_and_port(listen)
    if not port_is_free(host, port):
        print(
            f"rankside demo: {listen} is taken, by another sidecar or program; "
            "stop it, or run with RANKSIDE_LISTEN=127.0.0.1:PORT",
            file=sys.stderr,
        )
        return 1
    url = f"http://{listen}"
    # make runs this script as its child: when make is killed, so is the demo.
    die_with_parent(signal.SIGTERM)
    for signo in STOP_SIGNALS:
        signal.signal(signo, request_stop)
    run_dir = tempfile.mkdtemp(prefix="rankside-demo-")
    sock = os.path.join(run_dir, "rankside.sock")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sidecar = child(
            [sys.executable, "-m", "sidecar", "serve", "--socket", sock, "--listen", listen]
        )
        procs.append(sidecar)
        wait_ready(sidecar, url, sock)
        for rank in range(0 if stop_requested else WORKERS):
            env = {
                **os.environ,
                "RANKSIDE_SOCKET": sock,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(WORKERS),
                "LOCAL_WORLD_SIZE": str(WORKERS),
                "TORCHELASTIC_RUN_ID": "demo",
            }
            procs.append(child([sys.executable, str(HERE / "train_demo.py")], env))
        if not stop_requested:
            print(
                f"\nrankside demo: {WORKERS} workers on {sock}\n"
                f"  {url}/                      overview\n"
                f"  {url}/api/v1/workers        workers as JSON\n"
                f"  {url}/metrics               Prometheus metrics\n"
                f"  curl -X POST {url}/api/v1/workers/0/handlers/ping\n"
                "Ctrl-C stops everything.\n",
                flush=True,
            )
        while sidecar.poll() is None and not stop_requested:
            time.sleep(0.1)
        return 0 if stop_requested else sidecar.returncode or 1
    finally:
        # Workers first, so that they say goodbye to a sidecar still listening.
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if proc is procs[0] else signal.SIGINT)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
