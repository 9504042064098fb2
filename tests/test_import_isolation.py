"""What importing worker_hooks does: a sidecar process stays a sidecar, not a worker.

The sidecar imports the wire format and the py-spy lookup from worker_hooks. If
that dragged in the worker's side, every sidecar would hold a registry of
worker handlers and a worker metric registry with its samplers: state nobody
serves, and a trap for the next import. These tests run a real sidecar with a
real worker and look at the mechanisms (the handler table, live registries),
not only at module names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, WORKERS, free_port

# Runs in a fresh interpreter: every sidecar module imported, then a real
# sidecar serving a real worker, then a look at what the process holds.
SIDECAR_PROCESS = r"""
import gc, importlib, json, os, pkgutil, runpy, signal, subprocess, sys, threading, time
import httpx
import sidecar

socket_path, port, worker_script, worker_log = sys.argv[1:5]
# Walked rather than listed, so that the test follows the sidecar's modules wherever they move.
# __main__ is run below, as `python -m sidecar` runs it: importing it would start the CLI.
for module in pkgutil.walk_packages(sidecar.__path__, "sidecar."):
    if not module.name.endswith(".__main__"):
        importlib.import_module(module.name)

url = f"http://127.0.0.1:{port}"
seen = {}


def wait(predicate, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def drive():
    worker = None
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            wait(lambda: client.get("/readyz").status_code == 200, "the sidecar")
            env = {**os.environ, "RANKSIDE_SOCKET": socket_path, "RANK": "0", "LOCAL_RANK": "0"}
            worker = subprocess.Popen(
                [sys.executable, worker_script], env=env,
                stdout=open(worker_log, "wb"), stderr=subprocess.STDOUT,
            )
            seen["worker_handlers"] = wait(
                lambda: client.get("/api/v1/workers/0/handlers").json().get("handlers"),
                "the worker's handlers",
            )
            seen["scraped"] = wait(
                lambda: "train_loss{" in client.get("/metrics").text, "the worker's metrics"
            )
            reply = client.post("/api/v1/workers/0/handlers/ping")
            seen["ping"] = [reply.status_code, reply.text]
    except BaseException as exc:
        seen["error"] = repr(exc)
    finally:
        if worker is not None:
            worker.kill()
            worker.wait()
        os.kill(os.getpid(), signal.SIGTERM)


threading.Thread(target=drive, daemon=True).start()
sys.argv = ["rankside", "serve", "--socket", socket_path, "--listen", f"127.0.0.1:{port}"]
try:
    runpy.run_module("sidecar", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    seen["exit"] = exc.code

loaded = sorted(name for name in sys.modules if name.startswith("worker_hooks"))
# The handler table itself. Importing the module registers nothing, so an
# empty table here means nothing in the sidecar registered a handler.
from worker_hooks import handlers

seen["handlers"] = handlers.handler_names()
# Whatever class builds metrics payloads, under whichever module: none may be alive.
seen["registries"] = [
    type(o).__qualname__
    for o in gc.get_objects()
    if str(type(o).__module__).startswith("worker_hooks") and hasattr(o, "collect_payload")
]
seen["loaded"] = loaded
print(json.dumps(seen))
"""


def run_python(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_a_sidecar_holds_no_worker_handlers_and_no_worker_registry(tmp_path: Path) -> None:
    seen = json.loads(
        run_python(
            SIDECAR_PROCESS,
            str(tmp_path / "rankside.sock"),
            str(free_port()),
            str(WORKERS / "metrics_worker.py"),
            str(tmp_path / "worker.log"),
        )
    )
    # The sidecar really served: the worker's handlers and metrics came through it.
    assert "error" not in seen, seen
    assert seen["exit"] == 0
    assert {"ping", "dump_traceback", "py_profile"} <= set(seen["worker_handlers"])
    assert seen["scraped"] is True
    assert seen["ping"] == [200, "pong"]
    # ...and the sidecar's own process is no worker.
    assert seen["handlers"] == []
    assert seen["registries"] == []
    worker_side = {"builtin_handlers", "collectors", "connection", "metrics", "registry"}
    assert not {f"worker_hooks.{name}" for name in worker_side} & set(seen["loaded"])


def loaded_by(statement: str) -> list[str]:
    code = (
        f"import json, sys\n{statement}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('worker_hooks'))))"
    )
    loaded: list[str] = json.loads(run_python(code))
    return loaded


def test_the_modules_the_sidecar_imports_import_nothing_else() -> None:
    assert loaded_by("import worker_hooks.protocol") == ["worker_hooks", "worker_hooks.protocol"]
    assert loaded_by("from worker_hooks import protocol") == [
        "worker_hooks",
        "worker_hooks.protocol",
    ]
    assert loaded_by("import worker_hooks.pyspy") == ["worker_hooks", "worker_hooks.pyspy"]
    assert loaded_by("import worker_hooks") == ["worker_hooks"]


def test_public_names_load_on_first_use_and_then_cost_a_plain_lookup() -> None:
    code = (
        "import json, worker_hooks\n"
        "worker_hooks.step()\n"
        "print(json.dumps({'lazy': '__getattr__' in vars(worker_hooks),\n"
        "                  'missing': [n for n in worker_hooks.__all__\n"
        "                              if n not in vars(worker_hooks)]}))"
    )
    # CPython specialises attribute lookups on a module only while it has no
    # __getattr__; worker_hooks.step() in a training loop depends on that.
    assert json.loads(run_python(code)) == {"lazy": False, "missing": []}


def test_builtin_handlers_come_with_the_connection_and_never_replace_a_programs_own() -> None:
    code = (
        "import json\n"
        "from worker_hooks.handlers import Request, Response, dispatch, handler_names\n"
        "from worker_hooks.handlers import register_handler\n"
        "before = handler_names()\n"
        "register_handler('ping', lambda request: Response('mine'))\n"
        "import worker_hooks.connection\n"
        "print(json.dumps({'before': before, 'after': handler_names(),\n"
        "                  'ping': dispatch('ping', Request()).body.decode()}))"
    )
    seen = json.loads(run_python(code))
    assert seen["before"] == []
    assert {"ping", "dump_traceback", "pyspy_dump", "py_profile"} <= set(seen["after"])
    assert seen["ping"] == "mine"
