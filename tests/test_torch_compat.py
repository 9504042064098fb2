"""torch's WorkerServer, through the sidecar.

The assertions of torch's WorkerServerTest (test/distributed/elastic/
test_control_plane.py), written anew against ``/workers/{rank}/...``, first
with a worker that never imports torch, then with one that does. That worker
also serves torch's own ``_WorkerServer`` in the same process, so the bridged
handlers are compared with torch's answers directly.

Importing torch takes seconds: one torch worker serves the whole module.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import wait_for
from node import Node

TORCH_INDEX = b'<h1>torch.distributed.WorkerServer</h1>\n<a href="/handler/">Handler names</a>\n'
TORCH_ONLY = {"wait_counter_values", "fr_trace_json", "torch_profile"}

PLAIN, TORCH = 0, 1


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    directory = tmp_path_factory.mktemp("torch")
    node = Node(directory).start()
    node.spawn("control_worker.py", rank=PLAIN)
    node.spawn(
        "torch_worker.py",
        rank=TORCH,
        env={"TORCH_COMPARE_SOCKET": str(directory / "torch.sock")},
    )
    node.sidecar.wait_workers(2)
    yield node
    node.close()


@pytest.fixture(scope="module")
def torch_imported_at(node: Node) -> float:
    """When the torch worker finished importing torch (wall clock, from its log)."""

    def marker() -> float | None:
        found = re.search(r"torch imported at ([\d.]+)", node.workers[TORCH].log())
        return float(found.group(1)) if found else None

    at: float = wait_for(marker, timeout=60, interval=0.01, what="the torch import")
    return at


@pytest.fixture
def client(node: Node, torch_imported_at: float) -> httpx.Client:
    return node.sidecar.client


@pytest.fixture(scope="module")
def torch_server(node: Node, torch_imported_at: float) -> Iterator[httpx.Client]:
    """torch's own _WorkerServer inside the torch worker, over its unix socket."""
    path = node.directory / "torch.sock"
    wait_for(path.exists, timeout=10, what="torch's server socket")
    with httpx.Client(
        transport=httpx.HTTPTransport(uds=str(path)), base_url="http://torch", timeout=30
    ) as client:
        yield client


def handler_names(client: httpx.Client, rank: int) -> list[str]:
    response = client.get(f"/workers/{rank}/handler/")
    assert response.status_code == 200
    names: list[str] = json.loads(response.content)
    return names


# -- WorkerServerTest, without torch in the worker ---------------------------------------


@pytest.mark.parametrize("rank", [PLAIN, TORCH])
def test_index(client: httpx.Client, rank: int) -> None:
    response = client.get(f"/workers/{rank}/")
    assert response.status_code == 200
    assert response.content == TORCH_INDEX
    assert response.headers["content-type"] == "text/html"


@pytest.mark.parametrize("rank", [PLAIN, TORCH])
def test_handler_names(client: httpx.Client, rank: int) -> None:
    response = client.get(f"/workers/{rank}/handler/")
    assert response.headers["content-type"] == "application/json"
    names = handler_names(client, rank)
    assert "ping" in names and "dump_traceback" in names and "pyspy_dump" in names


@pytest.mark.parametrize("rank", [PLAIN, TORCH])
def test_ping(client: httpx.Client, rank: int) -> None:
    response = client.post(f"/workers/{rank}/handler/ping")
    assert response.status_code == 200
    assert response.content == b"pong"


@pytest.mark.parametrize("rank", [PLAIN, TORCH])
def test_unknown_handler(client: httpx.Client, rank: int) -> None:
    response = client.post(f"/workers/{rank}/handler/nonexistant")
    assert response.status_code == 404
    assert response.content == b"Handler nonexistant not found: Failed to find handler nonexistant"


def test_raising_handler(client: httpx.Client) -> None:
    response = client.post(f"/workers/{PLAIN}/handler/boom")
    assert response.status_code == 500
    assert response.content == b"Handler boom failed: ValueError: kaboom"


@pytest.mark.parametrize("rank", [PLAIN, TORCH])
def test_dump_traceback(client: httpx.Client, rank: int) -> None:
    response = client.post(f"/workers/{rank}/handler/dump_traceback")
    assert response.status_code == 200
    assert b" in training_loop\n" in response.content


def test_only_torchs_methods_are_routed(client: httpx.Client) -> None:
    assert client.get(f"/workers/{PLAIN}/handler/ping").status_code == 405
    assert client.post(f"/workers/{PLAIN}/handler/").status_code == 405
    assert client.get("/workers/99/").status_code == 404


def test_torch_handlers_are_not_listed_without_torch(client: httpx.Client) -> None:
    assert not TORCH_ONLY & set(handler_names(client, PLAIN))


# -- with torch imported after worker_main() ---------------------------------------------


def test_torch_handlers_appear_within_a_second_of_the_import(
    client: httpx.Client, torch_imported_at: float
) -> None:
    wait_for(
        lambda: set(handler_names(client, TORCH)) >= TORCH_ONLY,
        timeout=10,
        interval=0.01,
        what="torch's handlers in the list",
    )
    assert time.time() - torch_imported_at < 1.0


def test_torch_registered_later_is_bridged_too(
    client: httpx.Client, torch_imported_at: float
) -> None:
    wait_for(lambda: "torch_boom" in handler_names(client, TORCH), timeout=5, what="torch_boom")
    response = client.post(f"/workers/{TORCH}/handler/torch_boom")
    assert response.status_code == 500
    assert response.text.startswith("Handler torch_boom failed: ValueError: kaboom")


@pytest.mark.parametrize("name", ["ping", "wait_counter_values", "fr_trace_json", "torch_boom"])
def test_bridged_handler_answers_as_torchs_own_server(
    client: httpx.Client, torch_server: httpx.Client, name: str
) -> None:
    wait_for(lambda: name in handler_names(client, TORCH), timeout=5, what=name)
    ours = client.post(f"/workers/{TORCH}/handler/{name}")
    theirs = torch_server.post(f"/handler/{name}")
    assert ours.status_code == theirs.status_code
    assert ours.headers["content-type"] == theirs.headers["content-type"]
    if theirs.status_code == 500:
        # torch appends the Python traceback ("At: ...") after the same first line.
        assert theirs.text.startswith(ours.text)
    else:
        assert ours.content == theirs.content


def test_torch_profile(client: httpx.Client, torch_imported_at: float) -> None:
    wait_for(lambda: "torch_profile" in handler_names(client, TORCH), timeout=5, what="profile")
    response = client.post(f"/workers/{TORCH}/handler/torch_profile?duration=0.1")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert "traceEvents" in response.json()
    for bad in ("", "?duration=", "?duration=abc", "?duration=0", "?duration=1&foo=1"):
        response = client.post(f"/workers/{TORCH}/handler/torch_profile{bad}")
        assert response.status_code == 400, bad
        assert "'duration'" in response.text or "'foo'" in response.text


def test_handler_reading_torchs_parameter_map_gets_torchs_answer(
    client: httpx.Client, torch_server: httpx.Client
) -> None:
    """torch's C++ pyspy_dump reads the parameter multimap, which pybind11 cannot carry."""
    wait_for(lambda: "torch_pyspy_dump" in handler_names(client, TORCH), timeout=5, what="it")
    ours = client.post(f"/workers/{TORCH}/handler/torch_pyspy_dump?nonblocking=1")
    theirs = torch_server.post("/handler/pyspy_dump?nonblocking=1")
    assert ours.status_code == theirs.status_code
    if theirs.status_code != 200:
        assert ours.content == theirs.content


@pytest.fixture
def nccl_names(client: httpx.Client, torch_imported_at: float) -> set[str]:
    names = set(handler_names(client, TORCH))
    if "dump_nccl_trace_pickle" not in names:
        pytest.skip("this torch build has no NCCL, so no dump_nccl_trace_* handlers")
    return names


# Parameter sets torch's NCCL trace handlers take or refuse; which is which is
# torch's to say (the JSON handler takes no includestacktraces, for one), so
# the expectations come from torch's own server in the same run.
NCCL_QUERIES = (
    "",
    "?includecollectives=true",
    "?includecollectives=true&includestacktraces=false&onlyactive=true",
    "?onlyactive=true",
    "?includeCollectives=true",
    "?foo=bar",
    "?includecollectives=True",
    "?includecollectives=unknown",
)


@pytest.mark.parametrize("name", ["dump_nccl_trace_json", "dump_nccl_trace_pickle"])
def test_dump_nccl_trace_parameters(
    client: httpx.Client, torch_server: httpx.Client, nccl_names: set[str], name: str
) -> None:
    statuses = set()
    for query in NCCL_QUERIES:
        ours = client.post(f"/workers/{TORCH}/handler/{name}{query}")
        theirs = torch_server.post(f"/handler/{name}{query}")
        assert ours.status_code == theirs.status_code, (query, theirs.text)
        if theirs.status_code != 200:
            assert ours.content == theirs.content, query
        statuses.add(theirs.status_code)
    # Both kinds of answer were compared, not only one.
    assert {200, 400} <= statuses, statuses


def test_bridge_ignores_torch_until_imported(tmp_path: Path) -> None:
    """The bridge never imports torch itself: in a process without it, nothing changes."""
    import subprocess
    import sys

    code = (
        "import sys, worker_hooks\n"
        "from worker_hooks import torch_bridge\n"
        "assert torch_bridge.sync() == []\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
