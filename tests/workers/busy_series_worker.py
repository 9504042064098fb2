"""A worker with a ``sleep`` handler and 1,000 series (or argv[1]) it updates every step.

Every metrics push is then well over 8 KiB, the size past which the sidecar
used to decode payloads on its thread pool.
"""

import sys
import time

import worker_hooks
from worker_hooks import metrics

SERIES = metrics.counter("shard_items_total", "Items per shard.", ["shard"])

# The sleep handler of handler_worker.py, registered on import.
import handler_worker  # noqa: E402, F401

if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    children = [SERIES.labels(shard=str(i)) for i in range(count)]
    with worker_hooks.worker_main():
        while True:
            for child in children:
                child.inc()
            time.sleep(0.05)
            worker_hooks.step()
