"""A small CPU training-like loop: linear regression by SGD, one process per rank.

Run it under a sidecar with ``RANKSIDE_SOCKET`` set (``make demo`` does).
"""

from __future__ import annotations

import contextlib
import os
import random
import time

import worker_hooks


def train(rank: int) -> None:
    rng = random.Random(rank)
    true_w, true_b = 3.0, -1.0
    w, b, lr = 0.0, 0.0, 0.05
    step = 0
    while True:
        batch = [rng.uniform(-1, 1) for _ in range(64)]
        grad_w = grad_b = 0.0
        for x in batch:
            err = (w * x + b) - (true_w * x + true_b + rng.gauss(0, 0.1))
            grad_w += 2 * err * x
            grad_b += 2 * err
        w -= lr * grad_w / len(batch)
        b -= lr * grad_b / len(batch)
        # Slower ranks make the dashboard interesting.
        time.sleep(0.05 * (1 + rank))
        worker_hooks.step(step)
        step += 1


@worker_hooks.worker_main()
def main() -> None:
    # Ctrl-C ends the demo; worker_main() then reports a clean exit.
    with contextlib.suppress(KeyboardInterrupt):
        train(int(os.environ.get("RANK", "0")))


if __name__ == "__main__":
    main()
