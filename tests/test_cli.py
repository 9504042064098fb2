"""``rankside`` client commands against real sidecars and workers, across two nodes.

Node A runs ranks 0 and 1 and a stalled rank 2; node B runs rank 3. Both
need the same token, as the sidecars of one job do. A third address has
nothing listening: it stands for a node that is down.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, free_port, wait_for, write_token_file
from node import Node
from system_tools import require_tool

TOKEN = "cli-test-token"


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_file(tmp_path_factory.mktemp("cli-token"), TOKEN)


def start_node(directory: Path, token_file: Path, *args: str) -> Node:
    node = Node(directory, "--token-file", str(token_file), *args).start()
    node.sidecar.client.headers["Authorization"] = f"Bearer {TOKEN}"
    return node


@pytest.fixture(scope="module")
def node_a(tmp_path_factory: pytest.TempPathFactory, token_file: Path) -> Iterator[Node]:
    node = start_node(
        tmp_path_factory.mktemp("cli-a"),
        token_file,
        # Progress arrives with each heartbeat, once a second: a rank stepping
        # every 10 ms can look a second idle, and more under load.
        "--stall-after", "3",
        "--dump-dir", str(tmp_path_factory.mktemp("cli-dumps")),
    )  # fmt: skip
    node.spawn("train_loop.py", rank=0)
    node.spawn("train_loop.py", rank=1)
    node.spawn("staller.py", "sleep", "5", "1000", rank=2)
    node.sidecar.wait_workers(3)
    wait_for(lambda: node.sidecar.worker("2")["stalled"], 15, what="rank 2 stalled")
    wait_for(lambda: node.sidecar.client.get("/api/v1/dumps").json()["dumps"], 15, what="dumps")
    yield node
    node.close()


@pytest.fixture(scope="module")
def node_b(tmp_path_factory: pytest.TempPathFactory, token_file: Path) -> Iterator[Node]:
    node = start_node(tmp_path_factory.mktemp("cli-b"), token_file)
    node.spawn("train_loop.py", rank=3)
    node.sidecar.wait_workers(1)
    yield node
    node.close()


@pytest.fixture(scope="module")
def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def rankside(
    *args: str,
    url: str | None = None,
    token_file: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run the real command line, with the environment a user would set."""
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith("RANKSIDE_") and k != "NO_COLOR"
    }
    full_env["PYTHONPATH"] = str(ROOT)
    if url is not None:
        full_env["RANKSIDE_URL"] = url
    if token_file is not None:
        full_env["RANKSIDE_TOKEN_FILE"] = str(token_file)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.stdout, result.stderr
    return json.loads(result.stdout)


# -- workers ----------------------------------------------------------------------


def test_workers_table_and_json(node_a: Node, token_file: Path) -> None:
    result = rankside("workers", url=node_a.sidecar.url, token_file=token_file)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["RANK", "STATE", "STEP"]
    by_rank = {line.split()[0]: line for line in lines[1:4]}
    assert set(by_rank) == {"0", "1", "2"}
    assert by_rank["2"].split()[1] == "STALLED" and "no progress" in by_rank["2"]
    assert by_rank["0"].split()[1] == "running"
    assert "3 workers: 2 running, 1 stalled (rank 2)" in result.stdout

    data = as_json(rankside("workers", "--json", url=node_a.sidecar.url, token_file=token_file))
    assert [w["rank"] for w in data["workers"]] == [0, 1, 2]
    assert data["nodes"] == [{"url": node_a.sidecar.url, "ok": True, "error": None, "workers": 3}]
    running = data["workers"][0]
    assert running["resident_memory_bytes"] > 1 << 20
    assert running["progress_age"] < 5


def test_token_from_the_command_line_and_errors_that_say_what_to_do(
    node_a: Node, token_file: Path, dead_url: str
) -> None:
    ok = rankside("workers", "--url", node_a.sidecar.url, "--token", TOKEN)
    assert ok.returncode == 0, ok.stderr
    missing = rankside("workers", url=node_a.sidecar.url)
    assert missing.returncode == 1
    assert "requires a token" in missing.stderr and "RANKSIDE_TOKEN" in missing.stderr
    wrong = rankside("workers", url=node_a.sidecar.url, env={"RANKSIDE_TOKEN": "nope"})
    assert wrong.returncode == 1
    assert "refused the token" in wrong.stderr
    assert "nope" not in wrong.stderr
    down = rankside("workers", url=dead_url, token_file=token_file)
    assert down.returncode == 1
    assert "cannot reach" in down.stderr and "RANKSIDE_URL" in down.stderr
    unreadable = rankside("workers", url=node_a.sidecar.url, token_file=Path("/nonexistent"))
    assert unreadable.returncode == 1 and "cannot read the token file" in unreadable.stderr
    # The client reads a token file as the sidecar does: all of it, and not empty.
    empty = token_file.with_name("empty-token")
    empty.write_text("\n")
    blank = rankside("workers", url=node_a.sidecar.url, token_file=empty)
    assert blank.returncode == 1 and "is empty" in blank.stderr
    usage = rankside("call", "ping", "--rank", "0", "--ranks", "1")
    assert usage.returncode == 2


def test_two_nodes_merge_by_rank_and_the_unreachable_one_is_listed(
    node_a: Node, node_b: Node, token_file: Path, dead_url: str
) -> None:
    targets = ["--target", node_b.sidecar.url, "--target", dead_url, "--target", node_a.sidecar.url]
    result = rankside("workers", *targets, "--json", token_file=token_file)
    assert result.returncode == 3
    data = json.loads(result.stdout)
    assert [(w["rank"], w["node"]) for w in data["workers"]] == [
        (0, node_a.sidecar.url),
        (1, node_a.sidecar.url),
        (2, node_a.sidecar.url),
        (3, node_b.sidecar.url),
    ]
    nodes = {n["url"]: n for n in data["nodes"]}
    assert nodes[dead_url]["ok"] is False and "Connection refused" in nodes[dead_url]["error"]
    assert nodes[node_b.sidecar.url]["workers"] == 1

    human = rankside("workers", *targets, token_file=token_file)
    assert human.returncode == 3
    assert f"UNREACHABLE {dead_url}" in human.stdout
    assert "nodes 2/3 answered" in human.stdout
    assert "NODE" in human.stdout.splitlines()[0]


def test_dns_names_resolve_to_every_address(node_a: Node, token_file: Path) -> None:
    port = node_a.sidecar.port
    result = rankside(
        "workers", "--dns", f"127.0.0.1:{port}", "--dns", "no-such-service.invalid:9478",
        "--json", token_file=token_file,
    )  # fmt: skip
    data = json.loads(result.stdout)
    assert {w["rank"] for w in data["workers"]} == {0, 1, 2}
    failed = [n for n in data["nodes"] if not n["ok"]]
    assert [n["url"] for n in failed] == ["dns:no-such-service.invalid:9478"]
    assert "cannot resolve" in failed[0]["error"]
    assert result.returncode == 3


# -- call -------------------------------------------------------------------------


def test_call_one_rank_prints_its_body(node_a: Node, token_file: Path) -> None:
    result = rankside("call", "dump_traceback", "--rank", "0", url=node_a.sidecar.url,
                      token_file=token_file)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "most recent call first" in result.stdout
    assert "train_loop.py" in result.stdout

    unknown = rankside("call", "nope", "--rank", "0", url=node_a.sidecar.url,
                       token_file=token_file)  # fmt: skip
    assert unknown.returncode == 1
    assert "Handler nope not found" in unknown.stderr

    absent = rankside("call", "ping", "--rank", "7", url=node_a.sidecar.url,
                      token_file=token_file)  # fmt: skip
    assert absent.returncode == 1
    assert "no worker with rank 7" in absent.stderr and "rankside workers" in absent.stderr


def test_call_across_nodes_with_params(node_a: Node, node_b: Node, token_file: Path) -> None:
    targets = ["--target", node_a.sidecar.url, "--target", node_b.sidecar.url]
    result = rankside(
        "call", "set_log_level", "--ranks", "1,3", "--param", "level=DEBUG", "--json", *targets,
        token_file=token_file,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert list(data["ranks"]) == ["1", "3"]
    assert data["ranks"]["3"]["node"] == node_b.sidecar.url
    for answer in data["ranks"].values():
        assert answer["status"] == 200
        assert json.loads(answer["body"])["level"] == "DEBUG"
    assert data["summary"]["ok"] == 2

    human = rankside("call", "ping", "--ranks", "0,3,9", *targets, token_file=token_file)
    assert human.returncode == 3
    assert "=== rank 0 @ " in human.stdout and "=== rank 3 @ " in human.stdout
    assert human.stdout.count("pong") == 2
    assert "rank 9 not found on any node" in human.stderr


def test_call_every_worker_of_a_node(node_a: Node, token_file: Path) -> None:
    result = rankside("call", "ping", url=node_a.sidecar.url, token_file=token_file)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("===")] == [
        "=== rank 0: 200 ===",
        "=== rank 1: 200 ===",
        "=== rank 2: 200 ===",
    ]


# -- dumps and events ---------------------------------------------------------------


def test_dumps_list_and_show(node_a: Node, token_file: Path) -> None:
    listed = as_json(rankside("dumps", "--json", url=node_a.sidecar.url, token_file=token_file))
    dump = next(d for d in listed["dumps"] if d["worker"] == "2")
    table = rankside("dumps", url=node_a.sidecar.url, token_file=token_file)
    assert table.returncode == 0
    assert dump["id"] in table.stdout and dump["incident"].startswith("stall_")
    assert dump["incident"] in table.stdout
    shown = rankside("dumps", dump["id"], url=node_a.sidecar.url, token_file=token_file)
    assert shown.returncode == 0
    assert "staller.py" in shown.stdout
    missing = rankside("dumps", "nope", url=node_a.sidecar.url, token_file=token_file)
    assert missing.returncode == 1 and "rankside dumps" in missing.stderr


def test_events_and_follow_across_nodes(node_a: Node, node_b: Node, token_file: Path) -> None:
    recent = rankside("events", url=node_a.sidecar.url, token_file=token_file)
    assert recent.returncode == 0
    lines = recent.stdout.splitlines()
    stalled = [line for line in lines if "worker_stalled" in line]
    assert stalled and "rank 2" in stalled[0]
    # Oldest first: the connections come before the stall.
    assert lines.index(stalled[0]) > min(
        i for i, line in enumerate(lines) if "worker_connected" in line
    )

    follower = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "events", "--follow", "--count", "1", "--json",
         "--limit", "1", "--target", node_a.sidecar.url, "--target", node_b.sidecar.url],
        env={**os.environ, "PYTHONPATH": str(ROOT), "RANKSIDE_TOKEN_FILE": str(token_file)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert follower.stdout is not None
        # The newest event of the job comes first (--limit 1), then the new one.
        backlog = json.loads(follower.stdout.readline())
        assert backlog["node"] in (node_a.sidecar.url, node_b.sidecar.url)
        worker = node_b.spawn("train_loop.py", rank=6)
        new = json.loads(follower.stdout.readline())
        assert (new["kind"], new["worker"], new["node"]) == (
            "worker_connected",
            "6",
            node_b.sidecar.url,
        )
        assert follower.wait(10) == 0
    finally:
        follower.kill()
        follower.wait()
    worker.proc.kill()
    worker.proc.wait()


# -- top --------------------------------------------------------------------------


def test_top_redraws_with_the_stalled_rank_first(
    node_a: Node, node_b: Node, token_file: Path
) -> None:
    targets = ["--target", node_a.sidecar.url, "--target", node_b.sidecar.url]
    result = rankside(
        "top", "--iterations", "2", "--interval", "0.3", *targets, token_file=token_file
    )
    assert result.returncode == 0, result.stderr
    frames = [f for f in result.stdout.split("rankside top")[1:] if f.strip()]
    assert len(frames) == 2
    lines = frames[-1].splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("RANK"))
    rows = [line.split() for line in lines[header + 1 :] if line[:1] == " " or line[:1].isdigit()]
    assert rows[0][:2] == ["2", "STALLED"]
    # Every broken rank (an earlier test's rank 6 disconnected) before every running one.
    states = [row[1] for row in rows]
    assert states.index("running") > max(i for i, s in enumerate(states) if s != "running")
    assert {row[0] for row in rows if row[1] == "running"} == {"0", "1", "3"}
    assert "rank 2 stalled: no progress" in frames[-1]

    once = as_json(rankside("top", "--once", "--json", *targets, token_file=token_file))
    assert len(once["workers"]) >= 4


def test_top_in_a_real_terminal(node_a: Node, token_file: Path) -> None:
    """Under tmux: the screen redraws in place, and q quits."""
    tmux = require_tool("tmux", "make system-deps")
    server = f"rankside-test-{uuid.uuid4().hex[:8]}"
    session = "top"
    command = (
        f"PYTHONPATH={ROOT} RANKSIDE_URL={node_a.sidecar.url} "
        f"RANKSIDE_TOKEN_FILE={token_file} {sys.executable} -m sidecar top --interval 0.3"
        "; sleep 30"
    )

    def tmux_run(*args: str) -> str:
        return subprocess.run(
            [tmux, "-L", server, *args], capture_output=True, text=True, check=True
        ).stdout

    tmux_run("new-session", "-d", "-s", session, "-x", "150", "-y", "30", command)
    try:

        def screen() -> str:
            return tmux_run("capture-pane", "-p", "-t", session)

        first = wait_for(lambda: "STALLED" in (s := screen()) and s, 15, what="top's screen")
        assert first.lstrip().startswith("rankside top")
        # Drawn over itself, not scrolled: one title line however many frames.
        time.sleep(1.0)
        later = screen()
        assert later.count("rankside top") == 1
        assert later != first  # the steps and the clock moved
        tmux_run("send-keys", "-t", session, "q")
        # After q the alternate screen is gone and the shell's `sleep` holds the pane.
        wait_for(lambda: "rankside top" not in screen(), 10, what="top to quit on q")
    finally:
        subprocess.run([tmux, "-L", server, "kill-server"], capture_output=True)


def test_top_in_a_short_terminal_says_what_it_cuts(node_a: Node, token_file: Path) -> None:
    """Rows that do not fit are counted, not dropped silently; --once does not offer q."""
    tmux = require_tool("tmux", "make system-deps")
    server = f"rankside-test-{uuid.uuid4().hex[:8]}"
    # The pane's own size, not one inherited from the test's environment; stderr
    # (httpx logs each request at INFO) would draw over the screen.
    command = (
        f"unset LINES COLUMNS; PYTHONPATH={ROOT} RANKSIDE_URL={node_a.sidecar.url} "
        f"RANKSIDE_TOKEN_FILE={token_file} {sys.executable} -m sidecar top --iterations 200"
        " --interval 0.2 2>/dev/null; sleep 30"
    )
    once = rankside("top", "--once", "--url", node_a.sidecar.url, token_file=token_file)
    assert once.returncode == 0, once.stderr
    assert "quits" not in once.stdout

    def tmux_run(*args: str) -> str:
        return subprocess.run(
            [tmux, "-L", server, *args], capture_output=True, text=True, check=True
        ).stdout

    tmux_run("new-session", "-d", "-s", "top", "-x", "150", "-y", "7", command)
    try:
        time.sleep(3)
        screen = tmux_run("capture-pane", "-p", "-t", "top")
        assert "more lines not shown: enlarge the terminal" in screen, screen
    finally:
        subprocess.run([tmux, "-L", server, "kill-server"], capture_output=True)


def test_console_script_is_installed() -> None:
    script = shutil.which("rankside", path=str(Path(sys.executable).parent))
    assert script is not None
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for command in ("serve", "run", "workers", "call", "dumps", "events", "top"):
        assert command in result.stdout


# -- what a worker reports cannot drive the terminal ----------------------------------

# Clears the screen, sets the window title and hides the cursor, if printed as is.
ESCAPES = "\x1b[2J\x1b]0;owned\x07\x1b[?25l"
TERMINAL_WORKER = (
    "import socket, time\n"
    f"socket.gethostname = lambda: 'host{ESCAPES}'\n"
    "import worker_hooks\n"
    "with worker_hooks.worker_main():\n"
    "    for _ in range(5):\n"
    "        time.sleep(0.02)\n"
    "        worker_hooks.step()\n"
    f"    raise RuntimeError('bad{ESCAPES}\\u202eend')\n"
)


def test_worker_strings_reach_the_terminal_escaped(tmp_path: Path) -> None:
    node = Node(tmp_path).start()
    try:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "RANK": "4",
            "RANKSIDE_SOCKET": node.socket_path,
        }
        worker = subprocess.run(
            [sys.executable, "-c", TERMINAL_WORKER], env=env, capture_output=True, timeout=30
        )
        assert worker.returncode != 0
        wait_for(lambda: (node.sidecar.worker("4") or {}).get("state") == "exited", 10)

        table = rankside("workers", url=node.sidecar.url)
        assert table.returncode == 0, table.stderr
        assert "\x1b" not in table.stdout and "\u202e" not in table.stdout
        row = next(line for line in table.stdout.splitlines() if line.lstrip().startswith("4 "))
        assert "host\\x1b[2J\\x1b]0;owned\\x07\\x1b[?25l" in row
        assert "RuntimeError: bad\\x1b[2J" in row and "\\u202eend" in row

        events = rankside("events", url=node.sidecar.url)
        assert events.returncode == 0, events.stderr
        assert "\x1b" not in events.stdout and "\u202e" not in events.stdout
        assert "bad\\x1b[2J" in events.stdout

        # --json stays as the sidecar sent it: JSON escapes control characters itself.
        data = as_json(rankside("workers", "--json", url=node.sidecar.url))
        assert data["workers"][0]["hostname"] == f"host{ESCAPES}"
    finally:
        node.close()
