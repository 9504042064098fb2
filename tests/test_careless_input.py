"""The ``rankside`` command line under the small mistakes people type, with real processes.

Each case once gave a traceback or the wrong exit status; now every one is a
usage error (status 2) naming the option, and nothing is started or reached.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest
from conftest import ROOT, SidecarProcess, WorkerProcess, free_port, wait_for

USAGE_ERRORS = [
    (["call", "ping", "--timeout", "1e20"], "argument --timeout"),
    (["call", "ping", "--timeout", "inf"], "argument --timeout"),
    (["call", "ping", "--timeout", "nan"], "argument --timeout"),
    (["top", "--interval", "nan"], "argument --interval"),
    (["top", "--interval", "1e300"], "argument --interval"),
    (["workers", "--url", "http://[::1"], "argument --url"),
    (["workers", "--url", "http://127.0.0.1:abc"], "argument --url"),
    (["workers", "--url", "http://127.0.0.1:99999"], "argument --url"),
    (["workers", "--url", "http://"], "argument --url"),
    (["workers", "--url", "127.0.0.1:19611"], "argument --url"),
    (["workers", "--target", "http://[::1"], "argument --target"),
    (["workers", "--dns", "localhost"], "argument --dns"),
    (["call", "ping", "--ranks", "5-2"], "argument --ranks"),
    (["serve", "--socket", "/nonexistent/s.sock", "--log-level", "bogus"], "argument --log-level"),
    (["serve", "--socket", "/nonexistent/s.sock", "--call-timeout", "nan"], "--call-timeout"),
    (["serve", "--socket", "/nonexistent/s.sock", "--grace", "1e20"], "argument --grace"),
]


@pytest.mark.parametrize(
    ("argv", "names"), USAGE_ERRORS, ids=[" ".join(argv) for argv, _ in USAGE_ERRORS]
)
def test_a_careless_value_is_a_usage_error_naming_its_option(argv: list[str], names: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        # Nothing to reach: a value that got through would say "cannot reach".
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
             "RANKSIDE_URL": f"http://127.0.0.1:{free_port()}"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert names in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot reach" not in result.stderr


def test_a_fan_out_without_ranks_addresses_the_live_workers(
    sidecar: SidecarProcess, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """One worker's exit does not make every `rankside call` partial for the grace period."""
    spawn_worker("train_loop.py", rank=0)
    leaving = spawn_worker("train_loop.py", rank=1)
    sidecar.wait_workers(2)
    leaving.proc.terminate()
    leaving.proc.wait(10)
    wait_for(lambda: (sidecar.worker("1") or {}).get("state") not in (None, "running"), 10)

    def call(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sidecar", "call", "ping", "--url", sidecar.url, "--json",
             *args],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip

    everyone = call()
    assert everyone.returncode == 0, everyone.stdout + everyone.stderr
    assert list(json.loads(everyone.stdout)["ranks"]) == ["0"]
    # Named, the ended worker is reported: a partial result.
    named = call("--ranks", "0,1")
    assert named.returncode == 3, named.stdout + named.stderr
    assert sorted(json.loads(named.stdout)["ranks"]) == ["0", "1"]
