"""A worker for control-plane tests.

Handlers: ``hang`` (blocks for a minute when HANG=1, else answers at once),
``boom`` (raises), ``echo`` (body back as octet-stream), ``binary`` (all 256
byte values) and ``register_late`` (registers a ``late`` handler when called).
"""

import os
import time

import worker_hooks
from worker_hooks import Request, Response


def hang(request: Request) -> Response:
    if os.environ.get("HANG") == "1":
        time.sleep(60)
    return Response("not hung")


def boom(request: Request) -> Response:
    raise ValueError("kaboom")


def echo(request: Request) -> Response:
    return Response(request.body, content_type="application/octet-stream")


def binary(request: Request) -> Response:
    return Response(bytes(range(256)), content_type="application/octet-stream")


def register_late(request: Request) -> Response:
    worker_hooks.register_handler("late", lambda request: Response("late and here"))
    return Response(str(time.time()))


for name, fn in [
    ("hang", hang),
    ("boom", boom),
    ("echo", echo),
    ("binary", binary),
    ("register_late", register_late),
]:
    worker_hooks.register_handler(name, fn)


def training_loop() -> None:
    while True:
        time.sleep(0.01)
        worker_hooks.step()


if __name__ == "__main__":
    with worker_hooks.worker_main():
        training_loop()
