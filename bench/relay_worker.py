"""The worker process of bench_relay.py: a training-like loop, as a real job runs.

``relay_worker.py rankside`` connects to the sidecar named by RANKSIDE_SOCKET;
``relay_worker.py torch PATH`` serves torch's own ``_WorkerServer`` on the unix
socket PATH instead, ``relay_worker.py torch-tcp PORT`` on 127.0.0.1:PORT.
``--no-torch`` leaves torch out (the fan-out workers: 64 processes importing
torch would measure memory, not the relay).
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack


def loop() -> None:
    import worker_hooks

    while True:
        time.sleep(0.01)
        worker_hooks.step()


def main() -> None:
    args = sys.argv[1:]
    with_torch = "--no-torch" not in args
    args = [a for a in args if a != "--no-torch"]
    if with_torch:
        import torch  # noqa: F401  (a training process has torch loaded)
    with ExitStack() as stack:
        if args[0].startswith("torch"):
            from torch._C._distributed_c10d import _WorkerServer

            tcp = args[0] == "torch-tcp"
            server = _WorkerServer("127.0.0.1", int(args[1])) if tcp else _WorkerServer(args[1])
            stack.callback(server.shutdown)
        else:
            import worker_hooks

            stack.enter_context(worker_hooks.worker_main())
        print("ready", flush=True)
        loop()


if __name__ == "__main__":
    main()
