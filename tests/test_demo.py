"""``make demo``: every way of stopping it leaves nothing behind; a taken port is said."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A short TMPDIR for the demo: its socket path must fit in 108 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="rs-demo-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line or environment holds ``text`` (the demo's run directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob:
            found.append(int(entry.name))
    return found


def start_demo(tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["make", "-s", "demo"],
        cwd=ROOT,
        env={**os.environ, "RANKSIDE_LISTEN": f"127.0.0.1:{port}", "TMPDIR": str(tmp_path)},
        # As a terminal runs it: make and the demo in one process group of their own.
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize(
    ("signo", "to_group"),
    [
        (signal.SIGINT, True),  # Ctrl-C: the terminal signals the whole foreground group
        (signal.SIGHUP, True),  # a closed terminal
        # kill <pid of make>: make alone gets it and passes SIGTERM on. (A SIGHUP
        # sent to make alone is not what a closed terminal does: make would
        # wait for a child it believes hung up too.)
        (signal.SIGTERM, False),
    ],
    ids=["SIGINT-group", "SIGHUP-group", "SIGTERM-make"],
)
def test_stopping_the_demo_leaves_no_process_behind(
    tmp_path: Path, signo: signal.Signals, to_group: bool
) -> None:
    port = free_port()
    demo = start_demo(tmp_path, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:

            def four_running() -> bool:
                workers = client.get("/api/v1/workers").json()["workers"]
                return sum(w["state"] == "running" for w in workers) == 4

            wait_for(four_running, 60, what="the demo's four workers")
        assert len(processes_mentioning(str(tmp_path))) >= 5  # the sidecar and four workers
        if to_group:
            os.killpg(demo.pid, signo)
        else:
            demo.send_signal(signo)
        demo.wait(30)
        wait_for(lambda: not processes_mentioning(str(tmp_path)), 15, what="no demo process")
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("rankside-demo-")]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
        for pid in processes_mentioning(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)


def test_a_taken_port_is_said_and_nothing_starts(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "first").mkdir()
    first = start_demo(tmp_path / "first", port)
    try:
        wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200,
            60,
            what="the first demo",
        )
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        started = time.monotonic()
        second = start_demo(second_dir, port)
        _, err = second.communicate(timeout=30)
        assert second.returncode != 0
        assert f"127.0.0.1:{port} is taken" in err.decode()
        assert time.monotonic() - started < 20
        assert not processes_mentioning(str(second_dir))
    finally:
        os.killpg(first.pid, signal.SIGINT)
        first.wait(30)


def test_a_sidecar_that_cannot_have_its_port_accepts_no_worker(tmp_path: Path) -> None:
    """It fails before it binds its worker socket, so no worker can register with it."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        sock = tmp_path / "s.sock"
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "serve", "--socket", str(sock),
             "--listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "another sidecar" in result.stderr
    assert not sock.exists()
