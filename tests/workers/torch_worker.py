"""A worker that imports torch only after ``worker_main()`` has connected.

Prints ``torch imported at <time>`` once torch is loaded. With
TORCH_COMPARE_SOCKET set it also serves torch's own ``_WorkerServer`` there,
in the same process, so tests can compare the two answer for answer. Adds a
raising handler through torch's registry, and torch's own ``pyspy_dump`` as
``torch_pyspy_dump`` (rankside's built-in shadows the name).
"""

import os
import sys
import time

import worker_hooks


def torch_boom(request: object, response: object) -> None:
    raise ValueError("kaboom")


def training_loop() -> None:
    while True:
        time.sleep(0.01)
        worker_hooks.step()


if __name__ == "__main__":
    with worker_hooks.worker_main():
        connection = worker_hooks.current_connection()
        assert connection is not None and connection.wait_connected(10)
        import torch  # noqa: F401
        from torch._C._distributed_c10d import _register_handler, _WorkerServer

        print(f"torch imported at {time.time()}", flush=True)
        _register_handler("torch_boom", torch_boom)
        worker_hooks.torch_bridge.bridge("torch_pyspy_dump", "pyspy_dump")
        compare = os.environ.get("TORCH_COMPARE_SOCKET")
        server = _WorkerServer(compare) if compare else None
        sys.stdout.flush()
        training_loop()
