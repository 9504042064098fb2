"""The event stream reader: the HTML standard's parsing rules, and real streams over HTTP."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from conftest import SidecarProcess, WorkerProcess, wait_for

from sidecar.client.http import Client
from sidecar.client.sse import MAX_LINE, EventStream, ServerSentEvent


def parse(*chunks: bytes, stream: EventStream | None = None) -> list[ServerSentEvent]:
    stream = stream if stream is not None else EventStream()
    stream.begin()
    return [event for chunk in chunks for event in stream.feed(chunk)]


def data(*chunks: bytes) -> list[str]:
    return [event.data for event in parse(*chunks)]


def test_exactly_one_space_after_the_colon_is_dropped() -> None:
    assert data(b"data:x\n\n", b"data: x\n\n", b"data:  x\n\n", b"data:\tx\n\n") == [
        "x",
        "x",
        " x",
        "\tx",
    ]
    # The same rule for every field: an event type of " b" is not "b".
    (event,) = parse(b"event:  b\ndata: 1\n\n")
    assert event.type == " b"


def test_data_lines_join_with_newlines_and_the_standards_examples() -> None:
    assert data(b"data: YHOO\ndata: +2\ndata: 10\n\n") == ["YHOO\n+2\n10"]
    # The standard's second example: "data" alone is a line of empty data, so
    # the first block is an event with data "", the second one with "\n", and
    # the last, with no blank line after it, is not dispatched.
    assert data(b"data\n\ndata\ndata\n\ndata:\n") == ["", "\n"]
    (named,) = parse(b"event: worker_stalled\ndata: {}\n\n")
    assert (named.type, named.data) == ("worker_stalled", "{}")
    (plain,) = parse(b"data: {}\n\n")
    assert plain.type == "message"


def test_comments_and_unknown_fields_are_ignored_and_dispatch_nothing() -> None:
    stream = EventStream()
    assert parse(b"id: 3\ndata: a\n\n", b": keep-alive\n\n", b"foo: bar\n\n", stream=stream) == [
        ServerSentEvent("message", "a", "3")
    ]
    assert stream.last_event_id == "3"


def test_every_line_ending_and_chunk_boundaries() -> None:
    assert data(b"data: a\r\n\r\ndata: b\rdata: c\r\rdata: d\n\n") == ["a", "b\nc", "d"]
    # A CRLF split between two chunks is one line end, not two.
    assert data(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == ["a\nb"]
    # A UTF-8 character split between chunks comes out whole.
    text = "Übergröße".encode()
    assert data(b"data: " + text[:2], text[2:] + b"\n\n") == ["Übergröße"]
    assert data(b"data: \xff\n\n") == ["\ufffd"]


def test_a_leading_byte_order_mark_is_skipped_once() -> None:
    assert data(b"\xef\xbb", b"\xbfdata: a\n\n") == ["a"]
    # Only the first: a second is part of the field name, an unknown field.
    assert data(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n") == []


def test_id_is_kept_across_events_and_connections() -> None:
    stream = EventStream()
    events = parse(b"id: 7\ndata: a\n\ndata: b\n\n", stream=stream)
    assert [e.last_event_id for e in events] == ["7", "7"]
    # An id with NUL is ignored; an empty id clears it.
    assert parse(b"id: 8\x009\ndata: c\n\n", stream=stream)[0].last_event_id == "7"
    assert parse(b"id\ndata: d\n\n", stream=stream)[0].last_event_id == ""
    # An id on an event without data still counts once the blank line comes.
    parse(b"id: 12\n\n", stream=stream)
    assert stream.last_event_id == "12"
    # A new connection resumes from it; an event it does not finish is dropped, id and all.
    assert parse(b"data: e\n\n", stream=stream)[0].last_event_id == "12"
    parse(b"id: 13\ndata: half", stream=stream)
    stream.end()
    assert stream.last_event_id == "12"
    assert parse(b"\n\ndata: f\n\n", stream=stream) == [ServerSentEvent("message", "f", "12")]


def test_retry_takes_ascii_digits_only() -> None:
    stream = EventStream()
    assert stream.reconnect_delay(2.0) == 2.0
    parse(b"retry: 1500\n", stream=stream)
    assert stream.retry == 1500 and stream.reconnect_delay(2.0) == 1.5
    for bad in (b"retry: -1\n", b"retry: 1.5\n", b"retry: +3\n", b"retry:  3\n",
                "retry: ٣\n".encode(), b"retry:\n", b"retry: 1_000\n"):  # fmt: skip
        parse(bad, stream=stream)
        assert stream.retry == 1500, bad
    # It takes effect as it is read, event or not, and outlives the connection.
    parse(b"retry: 0\n", stream=stream)
    assert stream.retry == 0


def test_an_endless_line_is_refused() -> None:
    stream = EventStream()
    with pytest.raises(ValueError, match="longer than"):
        stream.feed(b"data: " + b"x" * (MAX_LINE + 1))


# -- over HTTP ----------------------------------------------------------------------------


class Scripted(BaseHTTPRequestHandler):
    """An event stream that answers each connection with the next scripted body."""

    bodies: ClassVar[list[bytes]] = []
    seen: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Last-Event-ID"))
        body = self.bodies.pop(0)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[Callable[[list[bytes]], tuple[str, list[str | None]]]]:
    servers: list[ThreadingHTTPServer] = []

    def serve(bodies: list[bytes]) -> tuple[str, list[str | None]]:
        seen: list[str | None] = []
        handler = type("Handler", (Scripted,), {"bodies": list(bodies), "seen": seen})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", seen

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_the_client_resumes_from_the_last_id_and_keeps_the_servers_retry(
    scripted: Callable[[list[bytes]], tuple[str, list[str | None]]],
) -> None:
    url, seen = scripted(
        [
            b'retry: 250\nid: 41\ndata: {"n": 1}\n\n: keep-alive\n\nid: 42\ndata: {"n": 2',
            b'data: {"n": 3}\n\n',
        ]
    )
    stream = EventStream()
    with Client(url) as client:
        # The second event was cut off with its connection: not dispatched, its id not taken.
        assert list(client.events(stream)) == [{"n": 1}]
        assert (stream.last_event_id, stream.reconnect_delay(2.0)) == ("41", 0.25)
        assert list(client.events(stream)) == [{"n": 3}]
    assert seen == [None, "41"]


def test_a_real_sidecars_stream_resumes_after_the_last_event(
    sidecar: SidecarProcess, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    spawn_worker(rank=0)
    sidecar.wait_workers(1)
    stream = EventStream("0")
    with Client(sidecar.url) as client:
        first: list[dict[str, Any]] = []
        for event in client.events(stream):
            first.append(event)
            if event["kind"] == "worker_connected":
                break
        assert stream.last_event_id == str(first[-1]["id"])
        assert [e["id"] for e in first] == sorted(e["id"] for e in first)

        spawn_worker(rank=1)
        wait_for(lambda: sidecar.worker("1"), 15, what="rank 1")
        later: list[dict[str, Any]] = []
        for event in client.events(stream):
            later.append(event)
            if event["kind"] == "worker_connected":
                break
    # Nothing seen twice, nothing skipped: the replay starts right after the last id.
    assert later[0]["id"] == first[-1]["id"] + 1
    assert later[-1]["worker"] == "1"
