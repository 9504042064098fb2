"""A small training-like loop: ``train_loop.py [STEPS] [SECONDS_PER_STEP]``.

Runs forever without STEPS. Exits with an exception when RAISE_AT_STEP is set.
"""

import os
import sys
import time

import worker_hooks


@worker_hooks.worker_main()
def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else -1
    pause = float(sys.argv[2]) if len(sys.argv) > 2 else 0.01
    raise_at = int(os.environ.get("RAISE_AT_STEP", "-1"))
    i = 0
    while i != steps:
        if i == raise_at:
            raise RuntimeError(f"loss is NaN at step {i}")
        time.sleep(pause)
        worker_hooks.step()
        i += 1


if __name__ == "__main__":
    main()
