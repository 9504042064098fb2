"""A worker of bench_job_diagnose.py: relay_worker's loop, with a hung job's collective positions.

A real gloo job of 64 ranks would need 64 processes importing torch (gigabytes
here, and seconds of CPU each on a 2-core machine); what a job-wide diagnosis
reads of a rank is its flight-recorder positions as the heartbeat carries
them, not torch itself. So each worker reports fixed positions, as the ranks of
a hung job do: every rank in the default group (all WORLD_SIZE ranks) has
enqueued collective #1207 and completed #1206, except HUNG_RANK (default the
last), which never enqueued #1207; each rank is also in its node's two-rank
subgroup, as with ``dist.new_subgroups(2)``. The heartbeat, the sidecar's
bookkeeping and the verdict see exactly what a real job sends.
"""

from __future__ import annotations

import os

import relay_worker

import worker_hooks
from worker_hooks.collectives import CollectiveProgress, GroupProgress

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])
HUNG = int(os.environ.get("HUNG_RANK", WORLD - 1))
SEQ = 1207


def positions(self: CollectiveProgress) -> dict[str, GroupProgress]:
    enqueued = SEQ - 1 if RANK == HUNG else SEQ
    node_pair = [RANK - RANK % 2, RANK - RANK % 2 + 1]
    return {
        "0": {
            "desc": "default_pg",
            "ranks": list(range(WORLD)),
            "enqueued": enqueued,
            "started": -1,
            "completed": SEQ - 1,
        },
        # new_subgroups makes every pair on every rank, in the same order, so
        # the pair's name is the same on both its ranks.
        str(1 + RANK // 2): {
            "desc": "pair",
            "ranks": node_pair,
            "enqueued": 40,
            "started": -1,
            "completed": 40,
        },
    }


def main() -> None:
    # The heartbeat reads CollectiveProgress.read(); this is its one stand-in.
    CollectiveProgress.read = positions  # type: ignore[method-assign]
    with worker_hooks.worker_main():
        print("ready", flush=True)
        relay_worker.loop()


if __name__ == "__main__":
    main()
