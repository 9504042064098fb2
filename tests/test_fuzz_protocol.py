"""Fuzzing the worker protocol: the frame decoder in-process, and a live sidecar's socket.

The decoder may refuse anything, but only with ``ProtocolError``: any other
exception would escape the sidecar's connection task and close the peer
without the error frame, the counter and the event the protocol promises.
What it accepts must be safe to keep: a header that later breaks a JSON
answer of the HTTP API is as bad as a crash.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SidecarProcess, wait_for
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from node import Node
from scrape import OPENMETRICS_ACCEPT, check_scrapes, samples_of
from wire import RawPeer

from worker_hooks import protocol
from worker_hooks.connection import FrameBuffer

FUZZ = settings(max_examples=200, deadline=None)
LIVE = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Any JSON-ish value, including what Python's json module writes but JSON has
# not (NaN, Infinity). Integers too long for int() are a case of their own below.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)


def header_for(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    """A header of ``kind`` whose fields are sometimes right and sometimes anything."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, types in protocol.REQUIRED_FIELDS.get(kind, {}).items():
        right: st.SearchStrategy[Any]
        if types == (str,):
            right = st.text(max_size=40)
        elif types == (int,):
            right = st.integers()
        elif types == (list,):
            right = st.lists(json_scalars, max_size=4)
        elif types == (dict,):
            keys = st.sampled_from(["rank", "pid", "role", "hostname"])
            right = st.dictionaries(keys, json_values)
        else:
            right = st.floats(allow_nan=True, allow_infinity=True) | st.integers()
        fields[name] = right | json_values
    return st.fixed_dictionaries({"type": st.just(kind)}, optional=fields)


any_header = st.sampled_from([*protocol.REQUIRED_FIELDS, "nonsense", ""]).flatmap(header_for)


def raw_header(header: dict[str, Any]) -> bytes:
    # allow_nan: the point is to send what a careless peer would.
    return json.dumps(header, allow_nan=True).encode()


def check_accepted(header: protocol.Header) -> None:
    """A header the decoder let through is typed as documented and re-encodes as strict JSON."""
    kind = header["type"]
    for name, types in protocol.REQUIRED_FIELDS[kind].items():
        assert isinstance(header[name], types) and not isinstance(header[name], bool)
    json.dumps(header, allow_nan=False)


# -- the decoder, in-process --------------------------------------------------------


@FUZZ
@given(st.binary(min_size=8, max_size=8), st.integers(min_value=1, max_value=2**33))
def test_prefix_is_bounded_or_refused(prefix: bytes, max_frame: int) -> None:
    try:
        header_len, body_len = protocol.parse_prefix(prefix, max_frame)
    except protocol.ProtocolError as exc:
        assert exc.reason in ("malformed", "oversize")
        return
    assert 0 < header_len <= protocol.MAX_HEADER
    assert header_len + body_len <= max_frame


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_as_a_header(raw: bytes) -> None:
    try:
        header = protocol.parse_header(raw)
    except protocol.ProtocolError:
        return
    check_accepted(header)


@FUZZ
@given(any_header)
def test_generated_headers(header: dict[str, Any]) -> None:
    try:
        accepted = protocol.parse_header(raw_header(header))
    except protocol.ProtocolError:
        return
    check_accepted(accepted)


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 200_000,
        b'{"a":' * 100_000,
        b'{"type":"heartbeat","step":1,"steps":1,"progress_time":NaN}',
        b'{"type":"heartbeat","step":1,"steps":1,"progress_time":Infinity}',
        b'{"type":"heartbeat","step":1,"steps":1,"progress_time":-Infinity}',
        b'{"type":"heartbeat","step":1,"steps":1,"progress_time":1e400}',
        b'{"type":"heartbeat","step":' + b"9" * 5000 + b',"steps":1,"progress_time":1}',
    ],
    ids=["deep-list", "deep-object", "nan", "inf", "-inf", "overflow", "long-int"],
)
def test_headers_found_by_the_fuzzer_are_refused(raw: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_header(raw)


frames = st.lists(
    st.tuples(
        st.fixed_dictionaries({"type": st.just("error"), "message": st.text(max_size=30)}),
        st.binary(max_size=50),
    ),
    max_size=6,
)


@FUZZ
@given(frames, st.data())
def test_frame_buffer_reassembles_any_split(
    sent: list[tuple[dict[str, Any], bytes]], data: st.DataObject
) -> None:
    stream = b"".join(protocol.encode(h, b) for h, b in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    buffer = FrameBuffer()
    got: list[tuple[protocol.Header, bytes]] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        got += buffer.feed(stream[start:cut])
        start = cut
    assert got == sent


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=8), st.integers(min_value=8, max_value=4096))
def test_frame_buffer_on_garbage(chunks: list[bytes], max_frame: int) -> None:
    buffer = FrameBuffer(max_frame)
    try:
        for chunk in chunks:
            for header, _ in buffer.feed(chunk):
                check_accepted(header)
    except protocol.ProtocolError:
        pass


# -- a live sidecar's socket ------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node = Node(tmp_path_factory.mktemp("fuzz"), "--max-frame", "65536", "--handshake-timeout", "5")
    node.start()
    node.spawn("train_loop.py", rank=0)
    node.sidecar.wait_workers(1)
    yield node
    node.close()


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def split_frames(data: bytes) -> list[protocol.Header]:
    headers = []
    while data:
        header_len, body_len = protocol.PREFIX.unpack(data[: protocol.PREFIX_SIZE])
        end = protocol.PREFIX_SIZE + header_len + body_len
        headers.append(protocol.parse_header(data[protocol.PREFIX_SIZE : end - body_len]))
        data = data[end:]
    return headers


def still_serving(side: SidecarProcess) -> None:
    """Alive, relaying, listing, and its scrape read by promtool and prometheus_client."""
    assert side.proc is not None and side.proc.poll() is None, side.log()
    assert side.client.post("/api/v1/workers/0/handlers/ping").text == "pong"
    assert side.client.get("/api/v1/workers").status_code == 200
    check_scrapes([side.client.get("/metrics").text])
    samples_of(side.client.get("/metrics", headers={"Accept": OPENMETRICS_ACCEPT}).text, True)


@LIVE
@given(st.binary(min_size=1, max_size=2000))
def test_random_bytes_on_the_socket(live: Node, data: bytes) -> None:
    """Garbage gets nothing or one error frame, then the sidecar closes; rank 0 is unharmed."""
    assume(not data.startswith(protocol.encode({"type": "hello"})[:8]))
    side = live.sidecar
    peer = RawPeer(side.socket_path, timeout=10)
    peer.send_raw(data)
    peer.sock.shutdown(socket.SHUT_WR)
    answer = read_all(peer.sock)
    peer.close()
    headers = split_frames(answer)
    assert len(headers) <= 1, headers
    if headers:
        assert headers[0]["type"] == "error" and headers[0]["message"]
    still_serving(side)


class Registered:
    """A raw peer that said hello as rank 9 and may then send anything."""

    def __init__(self, side: SidecarProcess) -> None:
        self.peer = RawPeer(side.socket_path, timeout=10)
        self.peer.hello(rank=9)
        assert self.peer.read()[0]["type"] == "welcome"


@LIVE
@given(st.lists(any_header, min_size=1, max_size=4))
def test_generated_frames_after_hello(live: Node, headers: list[dict[str, Any]]) -> None:
    """Whatever a registered peer sends, the API keeps answering valid JSON."""
    side = live.sidecar
    registered = Registered(side)
    for header in headers:
        try:
            registered.peer.send_raw(protocol.PREFIX.pack(len(raw_header(header)), 0))
            registered.peer.send_raw(raw_header(header))
        except (BrokenPipeError, ConnectionResetError):
            break  # refused an earlier frame and closed: allowed
    for path in ("/api/v1/workers", "/api/v1/workers/9", "/api/v1/events?limit=5", "/metrics"):
        response = side.client.get(path)
        assert response.status_code in (200, 404), (path, response.text)
        if path != "/metrics":
            response.json()
    registered.peer.close()
    still_serving(side)


reply_statuses = st.integers(min_value=-(2**40), max_value=2**40) | st.sampled_from(
    [100, 101, 103, 199, 200, 204, 205, 304, 404, 599, 600, 999, 1000]
)
content_types = st.text(max_size=30) | st.sampled_from(
    ["text/plain\r\nX-Injected: 1", "text/html\nSet-Cookie: a=b", "\x00", "text/ü", ""]
)


@LIVE
@given(reply_statuses, content_types, st.binary(max_size=200))
def test_any_reply_is_a_valid_http_answer(
    live: Node, status: int, content_type: str, body: bytes
) -> None:
    """A worker's reply, however odd, reaches the caller as valid HTTP or as a 502."""
    side = live.sidecar
    registered = Registered(side)
    wait_for(lambda: (side.worker("9") or {}).get("state") == "running", 5)
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            with httpx.Client(base_url=side.url, timeout=10) as client:
                result["response"] = client.post("/api/v1/workers/9/handlers/x?timeout=5")
        except httpx.HTTPError as exc:
            result["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    # The module's sidecar may also ask this peer for its stacks (a stall of
    # another peer captures every worker's): only the test's own call counts.
    header, _ = registered.peer.read()
    while header.get("handler") != "x":
        assert header["type"] == "call", header
        header, _ = registered.peer.read()
    registered.peer.send(
        {"type": "reply", "id": header["id"], "status": status, "content_type": content_type},
        body,
    )
    caller.join(15)
    assert "error" not in result, result
    response: httpx.Response = result["response"]
    header_safe = all(c == "\t" or " " <= c <= "~" for c in content_type)
    expected = status if 200 <= status <= 599 and header_safe else 502
    assert response.status_code == expected, response.text
    if response.status_code == 502:
        assert "error" in response.json()
    else:
        # A field value has no leading or trailing whitespace (RFC 9110 5.5):
        # HTTP carries " text/plain " as "text/plain".
        assert response.headers["content-type"] == content_type.strip(" \t")
        if status not in (204, 205, 304):
            assert response.content == body
    registered.peer.close()
    still_serving(side)


def test_sidecar_log_has_no_unhandled_errors(live: Node) -> None:
    """Runs last in this module: nothing the fuzzers sent escaped as a traceback."""
    time.sleep(0.2)
    log = Path(live.sidecar.log_path).read_text(errors="replace")
    assert "Traceback" not in log, log[-5000:]
