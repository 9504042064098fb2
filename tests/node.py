"""A sidecar and its workers that outlive one test, for module-scoped fixtures.

conftest's fixtures are per test; starting a sidecar and workers (and torch,
which takes seconds to import) for every control-plane test would be slow.
"""

from __future__ import annotations

from pathlib import Path

from conftest import SidecarProcess, WorkerProcess, free_port, start_worker


class Node:
    def __init__(self, directory: Path, *sidecar_args: str) -> None:
        self.directory = directory
        self.socket_path = str(directory / "rankside.sock")
        self.sidecar = SidecarProcess(
            socket_path=self.socket_path,
            port=free_port(),
            args=list(sidecar_args),
            log_path=directory / "sidecar.log",
        )
        self.workers: list[WorkerProcess] = []

    def start(self) -> Node:
        self.sidecar.start()
        return self

    def spawn(
        self, script: str, *args: str, rank: int | None = None, env: dict[str, str] | None = None
    ) -> WorkerProcess:
        worker = start_worker(
            script,
            args,
            self.socket_path,
            self.directory / f"worker-{len(self.workers)}.log",
            rank=rank,
            world_size=8,
            env=env,
        )
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
            worker.proc.wait()
        if self.sidecar.proc is not None and self.sidecar.proc.poll() is None:
            self.sidecar.proc.kill()
            self.sidecar.proc.wait()
        self.sidecar.client.close()
