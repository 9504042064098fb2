"""The container image, built and run the way deploy/kubernetes runs it.

Read-only root, uid 10001, every capability dropped, no privilege escalation,
the socket directory a volume shared with workers on the host, ``--listen``
from the environment and ``--token-file`` as in the manifests. Workers on the
host run as uid 10001, as the trainer container does in the pod.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_port, wait_for
from container import AS_KUBERNETES, ENGINE, LIMITS, NETWORK, ROOT, UID, image
from system_tools import prometheus_scraping

TOKEN = "s3cret-image-token"


@pytest.fixture(scope="module")
def tag() -> str:
    started = time.monotonic()
    built = image()
    size = subprocess.run(
        [*ENGINE, "image", "inspect", "--format", "{{.Size}}", built],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    print(f"\nimage {built}: {int(size) / 1e6:.0f} MB, ready in {time.monotonic() - started:.1f} s")
    return built


@pytest.fixture
def shared() -> Iterator[Path]:
    """The volume the pod shares: the socket directory, owned by uid 10001, and a token."""
    directory = Path(tempfile.mkdtemp(prefix="rs-img-", dir="/tmp"))
    directory.chmod(0o755)
    run = directory / "run"
    run.mkdir()
    os.chown(run, UID, UID)
    (directory / "token").write_text(TOKEN + "\n")
    (directory / "token").chmod(0o644)
    # worker_hooks is standard library only: a copy uid 10001 may read.
    shutil.copytree(ROOT / "worker_hooks", directory / "lib" / "worker_hooks")
    for script in ("train_loop.py", "staller.py"):
        shutil.copy(ROOT / "tests" / "workers" / script, directory / "lib")
    for entry in (directory / "lib").rglob("*"):
        entry.chmod(0o755 if entry.is_dir() else 0o644)
    (directory / "lib").chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


class Container:
    def __init__(self, tag: str, shared: Path, port: int) -> None:
        self.name = f"rankside-test-{port}"
        self.port = port
        self.started = time.monotonic()
        subprocess.run(
            [*ENGINE, "run", "-d", "--rm", "--name", self.name, *NETWORK, *LIMITS, *AS_KUBERNETES,
             "-v", f"{shared / 'run'}:/run/rankside",
             "-v", f"{shared / 'token'}:/etc/rankside/token:ro",
             "-e", f"RANKSIDE_LISTEN=127.0.0.1:{port}",
             tag, "--token-file", "/etc/rankside/token",
             # A quick stall detection and capture, for the staller below.
             "--heartbeat-timeout", "3", "--dump-timeout", "1"],
            check=True, capture_output=True,
        )  # fmt: skip
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )

    def ready_after(self) -> float:
        def ready() -> bool:
            return self.client.get("/readyz").status_code == 200

        wait_for(ready, 30, what="the container's /readyz")
        return time.monotonic() - self.started

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ENGINE, "exec", self.name, *argv], capture_output=True, text=True)

    def stop(self) -> float:
        """SIGTERM, as the kubelet sends it; the seconds until the container is gone."""
        started = time.monotonic()
        subprocess.run([*ENGINE, "kill", "--signal", "TERM", self.name], check=True,
                       capture_output=True)  # fmt: skip
        subprocess.run([*ENGINE, "wait", self.name], capture_output=True, timeout=30)
        return time.monotonic() - started

    def remove(self) -> None:
        self.client.close()
        subprocess.run([*ENGINE, "rm", "-f", self.name], capture_output=True)


def host_worker(shared: Path, rank: int, *argv: str) -> subprocess.Popen[bytes]:
    """A worker on the host, as uid 10001, with the system's python."""
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    script = argv or ("train_loop.py", "-1", "0.05")
    return subprocess.Popen(
        [python, str(shared / "lib" / script[0]), *script[1:]],
        env={"PYTHONPATH": str(shared / "lib"), "RANK": str(rank), "LOCAL_RANK": str(rank),
             "WORLD_SIZE": "3", "RANKSIDE_SOCKET": str(shared / "run" / "rankside.sock")},
        user=UID, group=UID, extra_groups=[],
    )  # fmt: skip


def running(container: Container, count: int) -> bool:
    workers = container.client.get("/api/v1/workers").json()["workers"]
    return sum(w["state"] == "running" for w in workers) == count


@pytest.mark.skipif(os.geteuid() != 0, reason="runs workers as uid 10001, which needs root")
# The module's image fixture counts against this test's time: a cold build
# (mmdebstrap and the image) takes 1-2 minutes, past pytest's 120 s default.
@pytest.mark.timeout(900)
def test_the_image_runs_as_kubernetes_runs_it(tag: str, shared: Path) -> None:
    container = Container(tag, shared, free_port())
    workers = [host_worker(shared, rank) for rank in range(2)]
    prometheus = contextlib.ExitStack()
    try:
        print(f"container ready after {container.ready_after():.2f} s")
        # What the manifests promise of it.
        assert container.exec("id", "-u").stdout.strip() == str(UID)
        for path in ("/opt/rankside/x", "/tmp/x", "/var/tmp/x"):  # a read-only root, no tmpfs
            assert container.exec("touch", path).returncode != 0, path
        status = container.exec("grep", "-E", "^(CapEff|NoNewPrivs)", "/proc/1/status").stdout
        assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status
        assert (
            container.client.get("/api/v1/workers", headers={"Authorization": ""}).status_code
            == 401
        )

        wait_for(lambda: running(container, 2), 30, what="the host's workers")
        rank0 = container.client.get("/api/v1/workers/0").json()
        assert rank0["pid"] > 0  # what the worker said; the socket's peer pid is 0 in here
        ping = container.client.post("/api/v1/workers/0/handlers/ping")
        assert ping.text == "pong"

        # A real Prometheus scrapes the container (probes and /metrics need no token).
        query = prometheus.enter_context(prometheus_scraping(shared, f"127.0.0.1:{container.port}"))
        up = wait_for(lambda: query("rankside_worker_up == 1"), 60, what="Prometheus")
        assert sorted(r["metric"]["rank"] for r in up) == ["0", "1"]

        # A worker that holds its GIL stalls; the capture lands in the volume. It
        # cannot answer, and py-spy cannot reach across the pid namespace: the
        # record says so.
        workers.append(host_worker(shared, 2, "staller.py", "gil", "20", "15"))
        dumps = shared / "run" / "rankside-dumps"

        def captured() -> list[Path]:
            return sorted(dumps.glob("*-2-pyspy_failed.txt"))

        (note,) = wait_for(captured, 30, what="the stall's capture in the volume")
        assert "not visible here" in note.read_text()
        assert list(dumps.glob("*-0-dump_traceback.txt")), sorted(dumps.iterdir())
        assert list(dumps.glob("*-2-dump_traceback_no_answer.txt")), sorted(dumps.iterdir())
        assert note.stat().st_uid == UID
        prometheus.close()
        sock = shared / "run" / "rankside.sock"
        assert sock.exists()

        took = container.stop()
        print(f"stopped {took:.2f} s after SIGTERM")
        assert took < 10  # inside the pod's terminationGracePeriodSeconds
        assert not sock.exists()

        # A restarted container gets its workers back: they reconnect by themselves.
        container.remove()
        container = Container(tag, shared, container.port)
        container.ready_after()
        wait_for(lambda: running(container, 3), 30, what="the workers back")
    finally:
        prometheus.close()
        for worker in workers:
            worker.kill()
            worker.wait()
        container.remove()
