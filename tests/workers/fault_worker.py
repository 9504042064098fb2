"""A worker for fault tests: ``fault_worker.py``.

Handlers: ``hang?seconds=`` (blocks a handler thread, for an hour by default)
and ``count`` (answers how many times it has run, this call included), so a
test can tell whether calls given up by the sidecar still ran later. With
``SLOW_PING=seconds`` the program registers its own ``ping``, which sleeps.
"""

import os
import threading
import time

import worker_hooks
from worker_hooks import Request, Response

_lock = threading.Lock()
_count = 0


def hang(request: Request) -> Response:
    time.sleep(float(request.get_param("seconds") or "3600"))
    return Response("woke up")


def count(request: Request) -> Response:
    global _count
    with _lock:
        _count += 1
        return Response(str(_count))


worker_hooks.register_handler("hang", hang)
worker_hooks.register_handler("count", count)
if os.environ.get("SLOW_PING"):
    slow = float(os.environ["SLOW_PING"])
    worker_hooks.register_handler("ping", lambda request: hang(Request([("seconds", str(slow))])))

if __name__ == "__main__":
    with worker_hooks.worker_main():
        while True:
            time.sleep(0.01)
            worker_hooks.step()
