"""A worker that a fuzz test drives through worker_hooks' public API.

    fuzz_api_worker.py COMMANDS_SOCKET MODE

The test listens on COMMANDS_SOCKET (a ``multiprocessing.connection``
listener: commands and answers are Python objects, so lone surrogates, bytes
and huge integers arrive exactly as generated). Each command calls one public
function with the values it carries; the answer says whether the call was
accepted, refused at the call with TypeError or ValueError (allowed), or
raised anything else (a crash, with its traceback), and whether the worker is
still connected to its sidecar.

MODE ``api`` runs every command inside one ``worker_main()``. MODE ``exits``
runs each ``raise`` command in a ``worker_main()`` of its own under
``RANK=<rank>``, whose body raises ``FuzzError(message)``: each is a worker
that ends with that exception.
"""

import os
import sys
import traceback
from multiprocessing.connection import Client
from typing import Any

# What a numpy integer looks like to step(), as careless_worker.py passes it.
from careless_worker import IntLike

import worker_hooks
from worker_hooks import Request, Response, metrics


class FuzzError(Exception):
    """What each worker of MODE exits ends with."""


def value_of(raw: Any) -> Any:
    """A command's value; ``{"$index": n}`` stands for an int-like object."""
    if isinstance(raw, dict) and set(raw) == {"$index"}:
        return IntLike(raw["$index"])
    return raw


# What the fuzz_reply handler returns, as the last "reply" command set it.
reply: dict[str, Any] = {"value": Response("unset")}


def fuzz_reply(request: Request) -> Response:
    value: Response = reply["value"]
    return value


def echo(request: Request) -> Response:
    return Response("echo")


KINDS = {"counter": metrics.counter, "gauge": metrics.gauge, "histogram": metrics.histogram}


def run(command: dict[str, Any]) -> None:
    op = command["op"]
    if op == "metric":
        family = KINDS[command["kind"]](command["name"], command["doc"], command["labels"])
        series = family.labels(*command["values"]) if command["labels"] else family
        if command["kind"] == "gauge":
            series.set(1)
        elif command["kind"] == "counter":
            series.inc()
        else:
            series.observe(0.5)
    elif op == "step":
        if "value" in command:
            worker_hooks.step(value_of(command["value"]))
        else:
            worker_hooks.step()
    elif op == "handler":
        worker_hooks.register_handler(command["name"], echo)
    elif op == "reply":
        if command.get("raw"):
            reply["value"] = command["body"]
        else:
            reply["value"] = Response(command["body"], command["status"], command["content_type"])
    elif op == "raise":
        os.environ["RANK"] = str(command["rank"])
        try:
            with worker_hooks.worker_main():
                connection = worker_hooks.current_connection()
                assert connection is not None and connection.wait_connected(10)
                raise FuzzError(command["message"])
        except FuzzError:
            pass
    else:
        raise AssertionError(f"unknown command {op!r}")


def answer(command: dict[str, Any]) -> dict[str, Any]:
    try:
        run(command)
        outcome: dict[str, Any] = {"outcome": "ok"}
    except (TypeError, ValueError) as exc:
        outcome = {"outcome": "refused", "error": f"{type(exc).__name__}: {exc!r}"}
    except Exception:
        outcome = {"outcome": "crash", "error": traceback.format_exc()}
    connection = worker_hooks.current_connection()
    outcome["connected"] = connection is not None and connection.wait_connected(0)
    return outcome


def serve(commands: Any) -> None:
    while True:
        try:
            command = commands.recv()
        except EOFError:
            return
        commands.send(answer(command))


def main() -> None:
    commands = Client(sys.argv[1], family="AF_UNIX")
    if sys.argv[2] == "exits":
        commands.send({"outcome": "ready"})
        serve(commands)
        return
    worker_hooks.register_handler("fuzz_reply", fuzz_reply)
    with worker_hooks.worker_main():
        connection = worker_hooks.current_connection()
        assert connection is not None and connection.wait_connected(10)
        commands.send({"outcome": "ready"})
        serve(commands)


if __name__ == "__main__":
    main()
