"""Fixtures that run the real thing: a sidecar process and worker processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"


def torchrun() -> list[str]:
    """The torchrun script of this Python's environment (python -m as a fallback)."""
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def torchrun_env(**extra: str) -> dict[str, str]:
    """The environment of a gloo job on this machine: none of the test run's own
    rankside or torchelastic variables, rankside importable, one thread a rank."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANKSIDE_", "TORCHELASTIC_"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_token_file(directory: Path, token: str) -> Path:
    """A token file as an operator keeps one: the token and a newline, mode 0600."""
    path = directory / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail the test."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}: {last!r}")


@dataclass
class SidecarProcess:
    socket_path: str
    port: int
    args: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> SidecarProcess:
        cmd = [
            sys.executable, "-m", "sidecar", "serve",
            "--socket", self.socket_path,
            "--listen", f"127.0.0.1:{self.port}",
            *self.args,
        ]  # fmt: skip
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if wait:
            wait_for(self.ready, timeout=15, what="sidecar /readyz")
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"sidecar exited with {self.proc.returncode}:\n{self.log()}")
        return self.client.get("/readyz").status_code == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def workers(self) -> list[dict[str, Any]]:
        workers: list[dict[str, Any]] = self.client.get("/api/v1/workers").json()["workers"]
        return workers

    def worker(self, key: str) -> dict[str, Any] | None:
        response = self.client.get(f"/api/v1/workers/{key}")
        return response.json() if response.status_code == 200 else None

    def wait_workers(self, count: int, state: str = "running", timeout: float = 15) -> list[Any]:
        def enough() -> list[Any]:
            found = [w for w in self.workers() if w["state"] == state]
            return found if len(found) >= count else []

        result: list[Any] = wait_for(enough, timeout, what=f"{count} {state} workers")
        return result


@pytest.fixture
def sidecar_factory(tmp_path: Path) -> Iterator[Callable[..., SidecarProcess]]:
    started: list[SidecarProcess] = []

    def make(*args: str, socket_path: str | None = None, start: bool = True) -> SidecarProcess:
        side = SidecarProcess(
            socket_path=socket_path or str(tmp_path / "rankside.sock"),
            port=free_port(),
            args=list(args),
            log_path=tmp_path / f"sidecar-{len(started)}.log",
        )
        started.append(side)
        if start:
            side.start()
        return side

    yield make
    for side in started:
        if side.proc is not None and side.proc.poll() is None:
            side.proc.kill()
            side.proc.wait()
        side.client.close()


@pytest.fixture
def sidecar(sidecar_factory: Callable[..., SidecarProcess]) -> SidecarProcess:
    return sidecar_factory()


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_worker(
    script: str,
    args: Sequence[str],
    socket_path: str,
    log_path: Path,
    rank: int | None = None,
    world_size: int = 4,
    env: dict[str, str] | None = None,
) -> WorkerProcess:
    """Start ``tests/workers/<script>`` as a real worker process of ``socket_path``."""
    full_env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    }
    full_env["PYTHONPATH"] = str(ROOT)
    full_env["RANKSIDE_SOCKET"] = socket_path
    if rank is not None:
        full_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    full_env.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, str(WORKERS / script), *args],
        env=full_env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return WorkerProcess(proc, log_path)


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``tests/workers/<script>`` as a real worker process."""
    started: list[WorkerProcess] = []

    def spawn(
        script: str = "train_loop.py",
        *args: str,
        socket_path: str | None = None,
        rank: int | None = None,
        env: dict[str, str] | None = None,
    ) -> WorkerProcess:
        worker = start_worker(
            script,
            args,
            socket_path or str(tmp_path / "rankside.sock"),
            tmp_path / f"worker-{len(started)}.log",
            rank=rank,
            env=env,
        )
        started.append(worker)
        return worker

    yield spawn
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
        worker.proc.wait()
