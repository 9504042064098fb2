"""The ``rankside`` command line under the small mistakes people type, with real processes.

Each case once gave a traceback or the wrong exit status; now every one is a
usage error (status 2) naming the option, and nothing is started or reached.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, free_port

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
