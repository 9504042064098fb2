"""A training-like loop with metrics: ``metrics_worker.py [STEPS] [SECONDS_PER_STEP]``.

Runs forever without STEPS.
"""

import sys
import time

import worker_hooks
from worker_hooks import metrics

TOKENS = metrics.counter("tokens_processed_total", "Tokens processed.", ["split"])
LOSS = metrics.gauge("train_loss", "Loss of the last step.")
BATCH = metrics.histogram("batch_seconds", "Time per batch.", buckets=[0.001, 0.01, 0.1, 1])


@worker_hooks.worker_main()
def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else -1
    pause = float(sys.argv[2]) if len(sys.argv) > 2 else 0.01
    i = 0
    while i != steps:
        with BATCH.time():
            time.sleep(pause)
        TOKENS.labels(split="train").inc(128)
        LOSS.set(1.0 / (i + 1))
        worker_hooks.step()
        i += 1


if __name__ == "__main__":
    main()
