"""A worker given the careless values training code passes; says what was refused.

Handlers: ``good``, ``sleep?seconds=`` and ``big?bytes=`` (a reply of that
many bytes). Options, each a mistake of its own:

- ``--steps``: ``step()`` with a string, a float, a bool, a huge int and NaN,
  printing ``refused <value>: <error>`` for each refused at the call, then with
  an int-like object (as a numpy integer has ``__index__``) and, with
  ``--torch``, a 0-d int tensor; the last step number is 42.
- ``--bad-handler-name``: ``register_handler("h\\udc80", ...)``.
- ``--raise BYTES``: after connecting, raise an exception whose message is
  BYTES long and holds a lone surrogate.
"""

import sys
import time

import worker_hooks
from worker_hooks import Request, Response


class CarelessError(Exception):
    """The exception --raise ends the worker with."""


class IntLike:
    """What a numpy integer looks like to step(): an object with __index__."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def good(request: Request) -> Response:
    return Response("good")


def sleep(request: Request) -> Response:
    time.sleep(float(request.get_param("seconds") or "1"))
    return Response("slept")


def big(request: Request) -> Response:
    return Response(b"x" * int(request.get_param("bytes") or "0"), content_type="text/plain")


def careless_steps(use_torch: bool) -> None:
    for value in ("abc", 1.5, True, 10**30, float("nan")):
        try:
            worker_hooks.step(value)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            print(f"refused {value!r}: {type(exc).__name__}: {exc}", flush=True)
    worker_hooks.step(IntLike(41))  # type: ignore[arg-type]
    if use_torch:
        import torch

        worker_hooks.step(torch.tensor(42))  # type: ignore[arg-type]
    else:
        worker_hooks.step(IntLike(42))  # type: ignore[arg-type]
    print("stepped", flush=True)


def main() -> None:
    args = sys.argv[1:]
    worker_hooks.register_handler("sleep", sleep)
    worker_hooks.register_handler("big", big)
    if "--bad-handler-name" in args:
        try:
            worker_hooks.register_handler("h\udc80", good)
        except ValueError as exc:
            print(f"refused handler name: {exc}", flush=True)
    with worker_hooks.worker_main():
        connection = worker_hooks.current_connection()
        assert connection is not None
        # Registered after the connection's hello: it goes in a handlers frame.
        worker_hooks.register_handler("good", good)
        if "--steps" in args:
            careless_steps("--torch" in args)
            while True:
                time.sleep(0.05)
        if "--raise" in args:
            connection.wait_connected(30)
            size = int(args[args.index("--raise") + 1])
            raise CarelessError("bad \udc80 " + "m" * size)
        while True:
            time.sleep(0.02)
            worker_hooks.step()


if __name__ == "__main__":
    main()
