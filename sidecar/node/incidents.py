"""Capturing what every worker was doing: stacks on a stall, and periodic dumps.

A training job that hangs usually hangs in a collective: one rank stops and
every other rank waits for it, with no error anywhere. So on a stall the
sidecar asks *every* worker of the node for its stacks, not only the stalled
one; the healthy ranks' stacks show what they wait for. A worker that cannot
answer (it holds the GIL in C code, or is stopped) is dumped from outside with
py-spy when it is installed and allowed to attach.
"""

from __future__ import annotations

import asyncio
import itertools

from sidecar.config import Config
from sidecar.metrics import own
from sidecar.node.dumps import DumpStore
from sidecar.node.events import EventKind, EventLog
from sidecar.node.fanout import Caller, fan_out
from sidecar.node.workers import Worker, WorkerTable
from sidecar.schema import Reply, WorkerState
from worker_hooks.pyspy import find_pyspy

PYSPY_TIMEOUT = 30.0


class Incidents:
    """Captures dumps of every running worker into the dump store."""

    def __init__(
        self,
        caller: Caller,
        workers: WorkerTable,
        store: DumpStore,
        event_log: EventLog,
        config: Config,
    ) -> None:
        self.caller = caller
        self.workers = workers
        self.store = store
        self.events = event_log
        self.config = config
        self.pyspy = find_pyspy() if config.pyspy else None
        self._ids = itertools.count(1)
        # Captures run one at a time, so that two incidents (or an incident and
        # a periodic dump) never race each other's calls into the same workers.
        self._lock = asyncio.Lock()

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    async def capture(self, incident: str, handlers: tuple[str, ...]) -> None:
        """Call ``handlers`` on every running worker and keep what comes back."""
        async with self._lock:
            await self._capture(incident, handlers)

    async def _capture(self, incident: str, handlers: tuple[str, ...]) -> None:
        workers = [w for w in self.workers.all() if w.state is WorkerState.RUNNING]
        keys = [w.key for w in workers]
        for handler in handlers:
            results = await fan_out(self.caller, keys, handler, [], b"", self.config.dump_timeout)
            silent = [w for w in workers if not results[w.key].answered]
            for key, result in results.items():
                await self._save_result(incident, key, handler, result)
            if handler == "dump_traceback" and silent:
                await asyncio.gather(*(self._pyspy_dump(incident, w) for w in silent))

    async def _save_result(self, incident: str, key: str, handler: str, result: Reply) -> None:
        if result.answered and result.status == 200:
            await self._save(incident, key, handler, result.body, result.content_type)
            return
        note = (
            f"worker {key} did not answer {handler} within {self.config.dump_timeout:g} s: "
            f"{result.status} {result.body.decode(errors='replace')}\n"
        )
        await self._save(incident, key, f"{handler}_no_answer", note.encode(), "text/plain")

    async def _pyspy_dump(self, incident: str, worker: Worker) -> None:
        if not self.config.pyspy:
            return
        # The pid the kernel gave for the worker's socket, never the one its
        # hello claims: a peer must not point py-spy at another process.
        link = worker.link
        pid = link.peer_pid if link is not None else None
        if pid is None or self.pyspy is None:
            why = (
                "its process is not visible here (another pid namespace: a container)"
                if pid is None
                else "py-spy is not installed beside the sidecar (or set RANKSIDE_PYSPY)"
            )
            note = f"no py-spy dump of worker {worker.key}: {why}\n"
            await self._save(incident, worker.key, "pyspy_failed", note.encode(), "text/plain")
            return
        args = [self.pyspy, "dump", "--pid", str(pid)]
        if self.config.pyspy_native:
            args.append("--native")
        try:
            # An argument list, never a shell: nothing here is parsed by sh.
            proc = await asyncio.create_subprocess_exec(
                *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            try:
                out, err = await asyncio.wait_for(proc.communicate(), PYSPY_TIMEOUT)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                out, err = b"", f"py-spy timed out after {PYSPY_TIMEOUT:g} s".encode()
        except OSError as exc:
            out, err = b"", f"could not run py-spy: {exc}".encode()
        if out and proc.returncode == 0:
            await self._save(incident, worker.key, "pyspy", out, "text/plain")
        else:
            await self._save(incident, worker.key, "pyspy_failed", err or out, "text/plain")

    async def _save(
        self, incident: str, key: str, what: str, content: bytes, content_type: str
    ) -> None:
        try:
            await asyncio.to_thread(self.store.save, incident, key, what, content, content_type)
        except OSError as exc:
            self.events.record(
                EventKind.DUMP_FAILED,
                f"could not write the {what} dump of worker {key}: {exc}",
                key,
                incident=incident,
            )
            return
        own.DUMPS.inc()
