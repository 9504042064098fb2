"""A worker that stops making progress: ``staller.py MODE STALL_AT SECONDS``.

MODE ``sleep`` stops calling step() but stays responsive; ``gil`` blocks in C
code while holding the GIL (a call through ctypes.PyDLL keeps it), so that
nothing in the process, the rankside thread included, can run.
"""

import ctypes
import sys
import time

import worker_hooks


@worker_hooks.worker_main()
def main() -> None:
    mode, stall_at, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    step = 0
    while True:
        if step == stall_at:
            if mode == "gil":
                ctypes.PyDLL(None).sleep(int(seconds))
            else:
                time.sleep(seconds)
        time.sleep(0.02)
        worker_hooks.step()
        step += 1


if __name__ == "__main__":
    main()
