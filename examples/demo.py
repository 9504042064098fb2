"""``make demo``: a sidecar and four demo workers on this machine, until Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKERS = 4


def wait_ready(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the sidecar did not become ready at {url}")


def main() -> int:
    listen = os.environ.get("RANKSIDE_LISTEN", "127.0.0.1:9478")
    url = f"http://{listen}"
    run_dir = tempfile.mkdtemp(prefix="rankside-demo-")
    sock = os.path.join(run_dir, "rankside.sock")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # Children get their own sessions: Ctrl-C reaches only this script,
        # which then stops the workers before the sidecar, each exactly once.
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve", "--socket", sock, "--listen", listen],
            start_new_session=True,
        )
        procs.append(sidecar)
        wait_ready(url)
        for rank in range(WORKERS):
            env = {
                **os.environ,
                "RANKSIDE_SOCKET": sock,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(WORKERS),
                "LOCAL_WORLD_SIZE": str(WORKERS),
                "TORCHELASTIC_RUN_ID": "demo",
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(HERE / "train_demo.py")], env=env, start_new_session=True
                )
            )
        print(
            f"\nrankside demo: {WORKERS} workers on {sock}\n"
            f"  {url}/                      overview\n"
            f"  {url}/api/v1/workers        workers as JSON\n"
            f"  {url}/metrics               Prometheus metrics\n"
            f"  curl -X POST {url}/api/v1/workers/0/handlers/ping\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        while sidecar.poll() is None:
            time.sleep(0.5)
        return sidecar.returncode or 1
    except KeyboardInterrupt:
        return 0
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
