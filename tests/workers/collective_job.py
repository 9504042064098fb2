"""A gloo job for torchrun whose ranks sit at known collective positions.

``collective_job.py HANG_FILE``: every rank runs all_reduces on the default
group and a broadcast on a two-rank subgroup, calling step() each time. When
HANG_FILE appears, holding ``RANK`` or ``RANK FAULT``, that rank stops before
its next all_reduce, so the other ranks enter one it never joins. FAULT is how:

- ``sleep`` (the default): time.sleep, in Python;
- ``queue``: blocked in a data loader's ``queue.get`` that never gets a batch;
- ``gil``: libc's sleep called through ``ctypes.PyDLL``, which keeps the GIL,
  so not even rankside's thread runs;
- ``sigstop``: the process stops itself with SIGSTOP;
- ``exit``: the rank returns from main early, exit code 0.
"""

import ctypes
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

import worker_hooks


def fault_of(hang_file: str, rank: int) -> str | None:
    """The fault this rank is to show now, if HANG_FILE names it."""
    if not os.path.exists(hang_file):
        return None
    named, _, fault = Path(hang_file).read_text().strip().partition(" ")
    return (fault or "sleep") if named == str(rank) else None


def load(batches: "queue.Queue[int]", hang_file: str, rank: int) -> None:
    """A data loader thread: it stops producing once the rank's fault is ``queue``."""
    while fault_of(hang_file, rank) != "queue":
        time.sleep(0.05)


@worker_hooks.worker_main()
def main() -> None:
    hang_file = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pair = dist.new_group([0, 1], group_desc="pair")
    tensor = torch.ones(8)
    batches: queue.Queue[int] = queue.Queue()
    threading.Thread(target=load, args=(batches, hang_file, rank), daemon=True).start()
    while True:
        fault = fault_of(hang_file, rank)
        if fault == "sleep":
            time.sleep(3600)
        elif fault == "queue":
            batches.get()
        elif fault == "gil":
            ctypes.PyDLL(None).sleep(3600)
        elif fault == "sigstop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif fault == "exit":
            return
        dist.all_reduce(tensor)
        if rank in (0, 1):
            dist.broadcast(tensor, 0, group=pair)
        worker_hooks.step()
        time.sleep(0.05)


if __name__ == "__main__":
    main()
