"""``rankside run [serve options] -- COMMAND``, with real processes."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, WORKERS, SidecarProcess, free_port, wait_for, write_token_file

from sidecar.cli.run import split_argv

CHILD = str(WORKERS / "run_child.py")


def rankside_run(
    tmp_path: Path,
    *args: str,
    port: int,
    token: str | None = None,
    **popen: Any,
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANKSIDE_")}
    env.update(
        PYTHONPATH=str(ROOT),
        RUN_TEST_URL=f"http://127.0.0.1:{port}",
        RUN_TEST_TOKEN=token or "",
        TMPDIR=str(tmp_path),
    )
    popen.setdefault("stdout", (tmp_path / "run.log").open("ab"))
    popen.setdefault("stderr", subprocess.STDOUT)
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "--listen", f"127.0.0.1:{port}", *args],
        env=env,
        cwd=ROOT,
        **popen,
    )


def port_is_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_split_argv() -> None:
    assert split_argv(
        ["--grace", "5", "--ready-timeout", "3", "--", "torchrun", "--", "x"], []
    ) == (["--grace", "5"], ["torchrun", "--", "x"])
    assert split_argv(["--ready-timeout=3", "--insecure", "python", "-V"], ["python", "-V"]) == (
        ["--insecure"],
        ["python", "-V"],
    )


def test_runs_the_command_beside_a_sidecar(tmp_path: Path) -> None:
    """Serve's options reach the sidecar; the command finds it; its status is kept."""
    port = free_port()
    token_file = write_token_file(tmp_path, "t0ken")
    out = tmp_path / "report.json"
    proc = rankside_run(
        tmp_path,
        "--token-file", str(token_file), "--grace", "30",
        "--", sys.executable, CHILD, "check", str(out), "7",
        port=port,
        token="t0ken",
    )  # fmt: skip
    assert proc.wait(60) == 7, (tmp_path / "run.log").read_text()
    report = json.loads(out.read_text())
    assert report["socket_exists"] is True
    assert report["readyz"] == 200
    assert report["workers_without_token"] == 401  # --token-file reached the sidecar
    assert report["listed"] == "running"
    # The sidecar is gone, and so is the directory made for its socket.
    assert port_is_closed(port)
    assert Path(report["socket"]).parent.parent == tmp_path  # made under TMPDIR
    assert not os.path.exists(os.path.dirname(report["socket"]))


def test_given_socket_is_used(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "report.json"
    sock = tmp_path / "node.sock"
    proc = rankside_run(
        tmp_path,
        "--socket", str(sock),
        "--", sys.executable, CHILD, "check", str(out),
        port=port,
    )  # fmt: skip
    assert proc.wait(60) == 0, (tmp_path / "run.log").read_text()
    assert json.loads(out.read_text())["socket"] == str(sock)
    assert not sock.exists()


def test_exit_status_of_a_killed_command(tmp_path: Path) -> None:
    proc = rankside_run(tmp_path, "--", "sh", "-c", "kill -KILL $$", port=free_port())
    assert proc.wait(60) == 128 + signal.SIGKILL


def test_missing_command(tmp_path: Path) -> None:
    assert rankside_run(tmp_path, port=free_port()).wait(30) == 2
    proc = rankside_run(tmp_path, "--", str(tmp_path / "no-such-program"), port=free_port())
    assert proc.wait(60) == 127


def test_command_is_not_run_when_the_sidecar_cannot_start(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = rankside_run(tmp_path, "--", "touch", str(marker), port=port)
        assert proc.wait(60) == 1
    assert not marker.exists()
    assert "not running the command" in (tmp_path / "run.log").read_text()


def test_command_is_not_run_when_another_sidecar_holds_the_port(
    tmp_path: Path, sidecar_factory: Callable[..., SidecarProcess]
) -> None:
    """The other sidecar answers /readyz at once; ours cannot bind. Not our sidecar: not run."""
    other = sidecar_factory(socket_path=str(tmp_path / "other.sock"))
    marker = tmp_path / "ran"
    for _ in range(3):
        proc = rankside_run(tmp_path, "--", "touch", str(marker), port=other.port)
        assert proc.wait(60) == 1
        assert not marker.exists(), (tmp_path / "run.log").read_text()
    assert "not running the command" in (tmp_path / "run.log").read_text()


def test_sigterm_reaches_the_command_while_the_sidecar_is_up(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "report"
    proc = rankside_run(tmp_path, "--", sys.executable, CHILD, "signals", str(out), "42", port=port)
    wait_for(lambda: out.exists() and out.read_text() == "ready\n", 30, what="the command")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 42
    report = json.loads(out.read_text())
    assert report == {"received": ["SIGTERM"], "sidecar_readyz": 200}
    assert port_is_closed(port)


def _take_terminal() -> None:
    """In the child, after setsid: make its stdin, a pty, the controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_ctrl_c_reaches_the_command_once_and_not_the_sidecar(tmp_path: Path) -> None:
    """Ctrl-C typed in a real terminal: the command gets one SIGINT, the sidecar none."""
    port = free_port()
    out = tmp_path / "report"
    master, terminal = os.openpty()
    try:
        proc = rankside_run(
            tmp_path,
            "--", sys.executable, CHILD, "signals", str(out), "130",
            port=port,
            stdin=terminal,
            start_new_session=True,
            preexec_fn=_take_terminal,
        )  # fmt: skip
        wait_for(lambda: out.exists() and out.read_text() == "ready\n", 30, what="the command")
        # rankside run and the command form the terminal's foreground group.
        assert os.tcgetpgrp(master) == proc.pid
        time.sleep(0.2)
        os.write(master, b"\x03")  # Ctrl-C
        assert proc.wait(30) == 130
    finally:
        os.close(master)
        os.close(terminal)
    report = json.loads(out.read_text())
    assert report == {"received": ["SIGINT"], "sidecar_readyz": 200}
    assert port_is_closed(port)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1])
def test_signals_sent_to_rankside_run_are_passed_on(tmp_path: Path, sig: signal.Signals) -> None:
    """A signal sent with kill() to rankside run (not from a terminal) reaches the command."""
    out = tmp_path / "report"
    script = (
        "import signal, sys, time\n"
        f"signal.signal({int(sig)}, lambda s, f: sys.exit(50 + s))\n"
        f"open({str(out)!r}, 'w').write('ready')\n"
        "time.sleep(30)\n"
    )
    proc = rankside_run(tmp_path, "--", sys.executable, "-c", script, port=free_port())
    wait_for(lambda: out.exists(), 30, what="the command")
    proc.send_signal(sig)
    assert proc.wait(30) == 50 + sig
