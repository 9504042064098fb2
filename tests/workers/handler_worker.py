"""A worker with extra handlers: ``sleep?seconds=`` and ``echo``."""

import time

import worker_hooks
from worker_hooks import Request, Response


def sleep(request: Request) -> Response:
    seconds = float(request.get_param("seconds") or "1")
    time.sleep(seconds)
    return Response(f"slept {seconds}")


def echo(request: Request) -> Response:
    return Response(request.body, content_type="application/octet-stream")


worker_hooks.register_handler("sleep", sleep)
worker_hooks.register_handler("echo", echo)

if __name__ == "__main__":
    with worker_hooks.worker_main():
        while True:
            time.sleep(0.01)
            worker_hooks.step()
