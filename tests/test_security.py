"""Security: who may connect to the worker socket, who may call the API, and what
the sidecar does with what it is sent.

Covered elsewhere: the token, CORS and the loopback-only default on a few
routes (test_access), socket file modes (test_foundation), worker strings as
text in the page (test_page).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, SidecarProcess, WorkerProcess, wait_for, write_token_file
from test_stalls import events_of, metric_value

from sidecar.cli.main import build_parser
from sidecar.cli.options import config_from_args
from sidecar.http.access import OPEN_PATHS
from sidecar.http.page import is_page_path

SidecarFactory = Callable[..., SidecarProcess]
Spawn = Callable[..., WorkerProcess]
TOKEN = "tok-9f3c2a71e6b84d05-secret"
NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer as nobody")


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    return write_token_file(tmp_path, TOKEN)


# -- the worker socket: file permissions, then SO_PEERCRED --------------------------------

# Standard library only and no project import: it runs as nobody, who may not
# be able to read the project's directory.
PEER = r"""
import json, socket, struct, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(5)
try:
    sock.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect_error": type(exc).__name__}))
    sys.exit(0)
hello = json.dumps({"type": "hello", "version": 1, "handlers": [],
                    "identity": {"rank": 42, "pid": 1, "hostname": "h", "role": "r"}}).encode()
try:
    sock.sendall(struct.pack(">II", len(hello), 0) + hello)
except OSError:
    pass
data = b""
while True:
    try:
        chunk = sock.recv(65536)
    except OSError:
        break
    if not chunk:
        break
    data += chunk
    if len(data) >= 8:
        n, m = struct.unpack(">II", data[:8])
        if len(data) >= 8 + n + m:
            break
header = json.loads(data[8:8 + struct.unpack(">II", data[:8])[0]]) if len(data) >= 8 else None
print(json.dumps({"first_frame": header}))
"""


def run_as_nobody(path: str) -> dict[str, Any]:
    # The system's python: nobody may not traverse the directories of the venv's.
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    result = subprocess.run(
        [python, "-I", "-c", PEER, path],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory anyone may traverse, so that only the socket's own checks apply."""
    directory = Path(tempfile.mkdtemp(prefix="rankside-sec-", dir="/tmp"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


@needs_root
def test_peer_of_another_uid_is_refused(sidecar_factory: SidecarFactory, open_dir: Path) -> None:
    path = str(open_dir / "rankside.sock")
    side = sidecar_factory(socket_path=path)
    # Mode 0600: the file system refuses nobody before the sidecar hears of it.
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert run_as_nobody(path) == {"connect_error": "PermissionError"}
    # With the file opened up, SO_PEERCRED is what refuses the peer.
    os.chmod(path, 0o666)
    frame = run_as_nobody(path)["first_frame"]
    assert frame["type"] == "error"
    assert f"runs as uid {NOBODY}" in frame["message"] and "may not connect" in frame["message"]
    assert f"--allow-uid {NOBODY}" in frame["message"]
    rejected = events_of(side, "frame_rejected")
    assert rejected[0]["data"]["reason"] == "peer_credentials"
    # The event is also the sidecar's log line: it names the option that admits the peer.
    assert f"start the sidecar with --allow-uid {NOBODY}" in rejected[0]["message"]
    assert metric_value(side, 'rankside_frames_rejected_total{reason="peer_credentials"}') == 1
    assert side.worker("42") is None


@needs_root
def test_allowed_uid_is_welcomed(sidecar_factory: SidecarFactory, open_dir: Path) -> None:
    path = str(open_dir / "rankside.sock")
    sidecar_factory("--allow-uid", str(NOBODY), socket_path=path)
    os.chmod(path, 0o666)
    frame = run_as_nobody(path)["first_frame"]
    assert frame == {"type": "welcome", "version": 1, "key": "42", "max_frame": 64 * 1024 * 1024}


# -- the token on every route ------------------------------------------------------------------


def concrete(path: str) -> str:
    return path.replace("{worker}", "0").replace("{name}", "ping").replace("{id}", "x")


@pytest.fixture
def guarded(
    sidecar_factory: SidecarFactory, spawn_worker: Spawn, token_file: Path
) -> SidecarProcess:
    side = sidecar_factory("--token-file", str(token_file), "--log-level", "debug", start=False)
    side.client.headers.update(bearer())
    side.start()
    spawn_worker(rank=0)
    side.wait_workers(1)
    return side


def test_every_route_needs_the_token(guarded: SidecarProcess) -> None:
    """Every operation of /openapi.json (which test_control_plane keeps equal to the
    app's routes), refused without the right token; only the probes, /metrics and the
    page's own files (no data in them) are open."""
    paths = guarded.client.get("/openapi.json").json()["paths"]
    checked = 0
    wrong_tokens = [
        {},
        bearer(TOKEN + "x"),
        bearer(TOKEN[:-1]),
        bearer(TOKEN.upper()),
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN} {TOKEN}"},
        {"X-Token": TOKEN},
    ]
    with httpx.Client(base_url=guarded.url, timeout=10) as anonymous:
        for path, operations in paths.items():
            for method in operations:
                url = concrete(path)
                for headers in wrong_tokens:
                    response = anonymous.request(method, url, headers=headers)
                    if path in OPEN_PATHS or is_page_path(path):
                        assert response.status_code != 401, (method, url)
                    else:
                        assert response.status_code == 401, (method, url, headers)
                        assert TOKEN not in response.text
                # Not in the query string either: that would end up in logs and histories.
                sneaky = anonymous.request(method, f"{url}?token={TOKEN}&access_token={TOKEN}")
                if not (path in OPEN_PATHS or is_page_path(path)):
                    assert sneaky.status_code == 401, (method, url)
                checked += 1
        # A path that is no route is refused the same way: no route enumeration.
        assert anonymous.get("/no/such/route").status_code == 401
    assert checked >= 15


def test_secrets_are_never_logged(
    guarded: SidecarProcess, spawn_worker: Spawn, tmp_path: Path
) -> None:
    """Right and wrong tokens, at debug level: neither appears in the log or the API."""
    client = guarded.client
    assert client.post("/api/v1/workers/0/handlers/ping").text == "pong"
    assert client.post("/api/v1/handlers/ping").status_code == 200
    assert client.get("/api/v1/workers").status_code == 200
    near_misses = [TOKEN + "x", TOKEN[:-1], "wrong-" + TOKEN]
    for wrong in near_misses:
        response = client.get("/api/v1/workers", headers=bearer(wrong))
        assert response.status_code == 401 and wrong not in response.text
    exposed = client.get("/metrics").text + client.get("/api/v1/events").text
    assert TOKEN not in exposed
    assert guarded.stop(signal.SIGTERM) == 0
    log = guarded.log()
    for secret in [TOKEN, *near_misses]:
        assert secret not in log


# -- listening on the network needs a token ----------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "extra", "allowed"),
    [
        ("127.0.0.1:9478", [], True),
        ("[::1]:9478", [], True),
        ("localhost:9478", [], True),
        ("0.0.0.0:9478", [], False),
        ("[::]:9478", [], False),
        ("10.1.2.3:9478", [], False),
        ("node-7.cluster.local:9478", [], False),
        ("0.0.0.0:9478", ["--insecure"], True),
        ("0.0.0.0:9478", ["--token-file", "TOKEN"], True),
    ],
)
def test_non_loopback_needs_a_token_or_insecure(
    listen: str, extra: list[str], allowed: bool, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RANKSIDE_TOKEN_FILE", raising=False)
    args = ["serve", "--socket", "/tmp/x.sock", "--listen", listen]
    args += [str(token_file) if a == "TOKEN" else a for a in extra]
    parsed = build_parser().parse_args(args)
    if allowed:
        config = config_from_args(parsed)
        assert config.listen == listen
    else:
        with pytest.raises(SystemExit, match="refusing to listen"):
            config_from_args(parsed)


# -- nothing is unpickled or run through a shell ---------------------------------------------------

UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle"}
UNSAFE_CALLS = {"eval", "exec", "system", "popen", "create_subprocess_shell"}


# The one exception: a worker reads torch's recorder pickle that its own process
# made a moment ago, to rebuild gloo's empty group table (docs/diagnosis.md).
# Nothing from outside the process is ever unpickled, and never on the sidecar.
OWN_PICKLE = {("worker_hooks/collectives.py", "pickle")}


def source_files() -> list[Path]:
    return sorted([*ROOT.glob("sidecar/**/*.py"), *ROOT.glob("worker_hooks/**/*.py")])


def test_no_unpickling_and_no_shell_in_the_source() -> None:
    problems: list[str] = []
    for path in source_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                names = set()
            relative = str(path.relative_to(ROOT))
            unsafe = {n for n in names & UNSAFE_MODULES if (relative, n) not in OWN_PICKLE}
            if unsafe:
                problems.append(f"{where}: imports {unsafe}")
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in UNSAFE_CALLS:
                    problems.append(f"{where}: calls {name}")
                if name == "load" and isinstance(func, ast.Attribute):
                    owner = getattr(func.value, "id", "")
                    if owner in ("torch", "yaml", "pickle", "marshal"):
                        problems.append(f"{where}: calls {owner}.load")
                for keyword in node.keywords:
                    if keyword.arg == "shell" and not (
                        isinstance(keyword.value, ast.Constant) and keyword.value.value is False
                    ):
                        problems.append(f"{where}: shell=")
                if name in ("Popen", "run", "call", "check_output", "create_subprocess_exec"):
                    first = node.args[0] if node.args else None
                    if isinstance(first, (ast.Constant, ast.JoinedStr, ast.BinOp)):
                        problems.append(f"{where}: {name} with a command string")
    assert problems == []


def test_pyspy_parameters_never_reach_a_shell(guarded: SidecarProcess, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for value in [f"1; touch {marker}", f"$(touch {marker})", f"`touch {marker}`"]:
        for name in ("native", "subprocesses", "nonblocking"):
            response = guarded.client.post(
                "/api/v1/workers/0/handlers/pyspy_dump", params={name: value}
            )
            assert response.status_code == 400, response.text
            assert name in response.text
    assert guarded.client.post(f"/api/v1/workers/0/handlers/x; touch {marker}").status_code == 404
    assert not marker.exists()


# A peer that claims another process's pid in its hello, then falls silent.
LIAR = r"""
import json, socket, struct, sys, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
hello = json.dumps({"type": "hello", "version": 1, "handlers": [],
                    "identity": {"rank": 7, "pid": int(sys.argv[2]), "hostname": "h"}}).encode()
sock.sendall(struct.pack(">II", len(hello), 0) + hello)
time.sleep(60)
"""


def test_pyspy_dumps_the_peers_real_process_not_the_pid_it_claims(
    sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    side = sidecar_factory(
        "--heartbeat-timeout", "1", "--dump-timeout", "0.5", "--dump-dir", str(tmp_path / "d")
    )
    assert side.proc is not None
    victim = side.proc.pid  # the sidecar itself, say, or anything the sidecar may trace
    liar = subprocess.Popen([sys.executable, "-c", LIAR, side.socket_path, str(victim)])
    try:
        wait_for(lambda: side.worker("7"), 10, what="the peer")
        assert side.worker("7")["pid"] == victim  # type: ignore[index]

        def pyspy_dump() -> dict[str, Any] | None:
            dumps = side.client.get("/api/v1/dumps").json()["dumps"]
            return next((d for d in dumps if d["what"] in ("pyspy", "pyspy_failed")), None)

        dump = wait_for(pyspy_dump, 40, interval=0.2, what="a py-spy dump of the peer")
        text = side.client.get(f"/api/v1/dumps/{dump['id']}").text
        assert dump["what"] == "pyspy", text
        assert f"Process {liar.pid}" in text
        assert f"Process {victim}" not in text and "sidecar" not in text
    finally:
        liar.kill()
        liar.wait()


# -- what a worker returns is not served as a page of the sidecar's origin -----------------------


def test_relayed_replies_cannot_run_script_on_the_sidecars_origin(
    sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    side = sidecar_factory()
    # The job view relays the same reply from the node that runs the worker.
    job = sidecar_factory("--target", side.url, socket_path=str(tmp_path / "job.sock"))
    code = (
        "import time, worker_hooks\n"
        "page = '<script>fetch(\"/api/v1/workers\")</script>'\n"
        "worker_hooks.register_handler('page', lambda r: worker_hooks.Response("
        "page, content_type='text/html'))\n"
        "with worker_hooks.worker_main():\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": "0", "RANKSIDE_SOCKET": side.socket_path}
    worker = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        side.wait_workers(1)
        for client, url in [
            (side.client, "/api/v1/workers/0/handlers/page"),
            (side.client, "/workers/0/handler/page"),
            (job.client, "/api/v1/job/workers/0/handlers/page"),
        ]:
            response = client.post(url)
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "text/html"
            assert response.headers["content-security-policy"] == "sandbox"
            assert response.headers["x-content-type-options"] == "nosniff"
    finally:
        worker.kill()
        worker.wait()


def run_worker_as_nobody(directory: Path, socket_path: str) -> str:
    """A real worker_hooks worker as nobody for 2 s; its stderr."""
    # worker_hooks is standard library only: a copy anyone may read runs as nobody.
    if not (directory / "worker_hooks").exists():
        shutil.copytree(ROOT / "worker_hooks", directory / "worker_hooks")
        for entry in [directory / "worker_hooks", *(directory / "worker_hooks").rglob("*")]:
            entry.chmod(0o755 if entry.is_dir() else 0o644)
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    code = "import time, worker_hooks\nwith worker_hooks.worker_main():\n    time.sleep(2)\n"
    result = subprocess.run(
        [python, "-c", code],
        env={"PYTHONPATH": str(directory), "RANK": "42", "RANKSIDE_SOCKET": socket_path},
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr


@needs_root
def test_a_refused_worker_says_why_without_any_logging_set_up(
    sidecar_factory: SidecarFactory, open_dir: Path
) -> None:
    """A real worker of another uid is refused; its stderr says why, once, and what admits it."""
    path = str(open_dir / "rankside.sock")
    side = sidecar_factory(socket_path=path)
    # Mode 0600: refused by the file system.
    assert "--socket-group-access" in run_worker_as_nobody(open_dir, path)
    # Opened up: refused by the peer check, which names the option that admits it.
    os.chmod(path, 0o666)
    stderr = run_worker_as_nobody(open_dir, path)
    assert stderr.count(f"--allow-uid {NOBODY}") == 1, stderr
    assert f"runs as uid {NOBODY}" in stderr
    assert len(events_of(side, "frame_rejected")) >= 2  # it retried the whole time
    assert side.worker("42") is None
