"""Programs from the system that some tests drive: promtool, prometheus.

`make system-deps` installs them (the Debian package prometheus). Without
them a test skips on a developer's machine, but fails in CI (CI=true), where
.ci/run has installed them and a skip would hide a broken check.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str, install_hint: str = "make system-deps") -> str:
    """The path of ``name``; skips (fails under CI) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: run `{install_hint}`"
        if in_ci():
            pytest.fail(message + " (CI=true: this check may not be skipped)")
        pytest.skip(message)
    return path


def require_module(name: str, install_hint: str = "make") -> None:
    """Skip (fail under CI) when the Python module ``name`` cannot be imported."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        message = f"the Python module {name} is not installed: run `{install_hint}`"
        if in_ci():
            pytest.fail(message + " (CI=true: this check may not be skipped)")
        pytest.skip(message)


@contextlib.contextmanager
def prometheus_scraping(directory: Path, target: str) -> Iterator[Callable[[str], list[Any]]]:
    """A real Prometheus server scraping ``target`` (HOST:PORT) every second.

    Yields ``query(expr)``: the instant vector's result, [] until Prometheus answers.
    """
    binary = require_tool("prometheus")
    port = free_port()
    config = directory / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: rankside\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    log_path = directory / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def query(expr: str) -> list[Any]:
        if proc.poll() is not None:
            raise AssertionError(log_path.read_text())
        response = api.get("/api/v1/query", params={"query": expr})
        if response.status_code != 200:  # 503 in plain text until it is ready
            return []
        result: list[Any] = response.json()["data"]["result"]
        return result

    try:
        yield query
    finally:
        api.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
