"""A gloo job for torchrun whose ranks sit at known collective positions.

``collective_job.py HANG_FILE``: every rank runs all_reduces on the default
group and a broadcast on a two-rank subgroup, calling step() each time. When
HANG_FILE appears, the rank named in it stops before its next all_reduce and
sleeps, so the other ranks enter one the hung rank never joins.
"""

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import worker_hooks


@worker_hooks.worker_main()
def main() -> None:
    hang_file = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pair = dist.new_group([0, 1], group_desc="pair")
    tensor = torch.ones(8)
    while True:
        if os.path.exists(hang_file) and Path(hang_file).read_text() == str(rank):
            time.sleep(3600)
        dist.all_reduce(tensor)
        if rank in (0, 1):
            dist.broadcast(tensor, 0, group=pair)
        worker_hooks.step()
        time.sleep(0.05)


if __name__ == "__main__":
    main()
