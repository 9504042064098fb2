"""Fuzzing the worker's public API: whatever training code passes in, the node keeps working.

A real sidecar and a real worker process (``tests/workers/fuzz_api_worker.py``)
that calls ``worker_hooks`` with hypothesis-generated values: metric and
label names, help texts and label values, step values, handler names, the
replies handlers return, and the messages of the exceptions workers end
with. Each value is either refused at the call (TypeError or ValueError,
in the calling thread) or taken, and then it must show where the API says
it does: on ``/metrics``, in the worker listing, in a relayed reply, in the
exit the sidecar records. After every example the worker is still connected,
the sidecar recorded no refused frame and no reconnect, and its scrape
parses with prometheus_client's parser (and with promtool every
PROMTOOL_EVERY examples: a line once served stays in the scrape for the
worker's life, so a bad one is still there at the next check).

``RANKSIDE_FUZZ_EXAMPLES`` sets the examples per target (default 60 in the
suite; the issue's 10,000 is a run of its own, see docs/reliability.md).
"""

from __future__ import annotations

import math
import operator
import os
import re
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import WorkerProcess, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from node import Node
from prometheus_client.parser import text_string_to_metric_families
from scrape import OPENMETRICS_ACCEPT, promtool_check, samples_of

from worker_hooks import protocol

EXAMPLES = int(os.environ.get("RANKSIDE_FUZZ_EXAMPLES", "60"))
API = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
MAX_FRAME = 1024 * 1024
PROMTOOL_EVERY = 25
# A new worker process every so many examples: families and handlers only
# accumulate in a process, and a scrape of 10,000 families is slow to parse.
RECYCLE_EVERY = 400
# What the sidecar records when a worker's connection misbehaves or drops.
TROUBLE = {
    "frame_rejected",
    "worker_disconnected",
    "worker_connected",
    "worker_restarted",
    "worker_duplicate",
    "worker_exited",
    "worker_throttled",
}

# -- values as careless training code has them ---------------------------------------------

any_char = st.characters() | st.characters(categories=["Cs"])
any_text = st.text(any_char, max_size=40)
careless_bits = st.sampled_from(
    ["", "", "", "\n", "\r\n", " ", "-", ".", "\x00", "é", "\udc80", "{", '"', "\\", "\u2028", ":"]
)
valid_metric_name = st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,20}", fullmatch=True)
valid_label_name = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,12}", fullmatch=True)
not_strings = st.none() | st.integers() | st.floats() | st.binary(max_size=8) | st.booleans()


def careless(valid: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """In ten: four valid names, four near misses, one any text, one not text at all.

    Weighted by hand: ``a | b`` flattens nested choices, so the five kinds of
    non-text would otherwise be drawn five times as often as the names.
    """
    near = st.tuples(careless_bits, valid, careless_bits).map("".join)
    choices = [valid] * 4 + [near] * 4 + [any_text, not_strings]
    return st.integers(0, len(choices) - 1).flatmap(choices.__getitem__)


texts = (
    any_text
    | st.sampled_from(["\\", "\n", '"', "\\n", "\udc80", "a\x00b", "\u2028", "# HELP x y", "\r"])
    | st.text(any_char, min_size=200, max_size=2000)
)

PROMETHEUS_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
PROMETHEUS_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def has_lone_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


# -- a node, and a worker process driven by commands ------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node = Node(
        tmp_path_factory.mktemp("fuzzapi"),
        "--max-frame", str(MAX_FRAME),
        # The driven worker flushes every 5 ms: far more frames than a real one.
        "--max-frame-rate", "100000",
        # It steps only when told to: no stall captures in the middle of a run.
        "--stall-after", "100000",
        "--heartbeat-timeout", "120",
        # The ended workers of the exits target are forgotten soon.
        "--grace", "2",
    )  # fmt: skip
    node.start()
    yield node
    node.close()


class Driven:
    """A fuzz_api_worker process of ``mode`` as rank ``rank``, and the checks after each command."""

    def __init__(self, node: Node, mode: str, rank: int) -> None:
        self.node = node
        self.mode = mode
        self.rank = rank
        self.key = str(rank)
        self.commands_run = 0
        self._path = str(node.directory / f"commands-{mode}.sock")
        self._listener: Listener | None = None
        self._commands: Connection | None = None
        self.process: WorkerProcess | None = None
        self.last_event = 0
        self.start()

    def start(self) -> None:
        Path(self._path).unlink(missing_ok=True)
        self._listener = Listener(self._path, family="AF_UNIX")
        accepted: list[Connection] = []
        accepting = threading.Thread(target=lambda: accepted.append(self._listener.accept()))
        accepting.start()
        self.process = self.node.spawn(
            "fuzz_api_worker.py",
            self._path,
            self.mode,
            rank=self.rank,
            env={"RANKSIDE_FLUSH_INTERVAL": "0.005", "RANKSIDE_HEARTBEAT_INTERVAL": "0.005"},
        )
        accepting.join(30)
        assert accepted, self.process.log()
        self._commands = accepted[0]
        assert self._receive()["outcome"] == "ready"
        if self.mode == "api":
            self.node.sidecar.wait_workers(1)
        self.last_event = self.newest_event()

    def stop(self) -> None:
        if self._commands is not None:
            self._commands.close()
        if self._listener is not None:
            self._listener.close()
        if self.process is not None:
            self.process.proc.wait(15)

    def _receive(self) -> dict[str, Any]:
        assert self._commands is not None and self.process is not None
        if not self._commands.poll(30):
            raise AssertionError(f"the worker did not answer:\n{self.process.log()[-3000:]}")
        answer: dict[str, Any] = self._commands.recv()
        return answer

    def run(self, **command: Any) -> dict[str, Any]:
        """Run one command; fail on a crash or a lost connection, else the outcome."""
        if self.mode == "api" and self.commands_run and self.commands_run % RECYCLE_EVERY == 0:
            self.check_scrape(promtool=True)
            self.stop()
            self.start()
        assert self._commands is not None
        self.commands_run += 1
        self._commands.send(command)
        answer = self._receive()
        assert answer["outcome"] != "crash", answer["error"]
        if self.mode == "api":
            assert answer["connected"], answer
        return answer

    def newest_event(self) -> int:
        events = self.node.sidecar.client.get("/api/v1/events?limit=1").json()["events"]
        return int(events[0]["id"]) if events else 0

    def check_node(self) -> str:
        """No trouble with this worker's connection; the scrape parses. Gives the scrape."""
        side = self.node.sidecar
        events = side.client.get(f"/api/v1/events?since={self.last_event}").json()["events"]
        if events:
            self.last_event = events[0]["id"]
        trouble = [
            e
            for e in events
            if e["kind"] in TROUBLE and (e["worker"] == self.key or e["kind"] == "frame_rejected")
        ]
        assert not trouble, trouble
        return self.check_scrape(promtool=self.commands_run % PROMTOOL_EVERY == 0)

    def check_scrape(self, promtool: bool) -> str:
        side = self.node.sidecar
        text = side.client.get("/metrics").text
        samples_of(text)
        if promtool:
            promtool_check(text, lint=False)
            samples_of(
                side.client.get("/metrics", headers={"Accept": OPENMETRICS_ACCEPT}).text, True
            )
        return text


@pytest.fixture(scope="module")
def driven(node: Node) -> Iterator[Driven]:
    worker = Driven(node, "api", rank=0)
    yield worker
    worker.check_node()
    worker.check_scrape(promtool=True)
    worker.stop()


def user_samples(text: str, name: str) -> list[dict[str, str]]:
    """The label sets of samples called ``name``, without the labels the sidecar adds."""
    return [
        {k: v for k, v in s.labels.items() if k not in ("rank", "local_rank", "role")}
        for s in samples_of(text)
        if s.name == name
    ]


# -- the targets -------------------------------------------------------------------------

kinds = st.sampled_from(["counter", "gauge", "histogram"])


@API
@given(kinds, careless(valid_metric_name), st.lists(careless(valid_label_name), max_size=2))
def test_metric_and_label_names(driven: Driven, kind: str, name: Any, labels: list[Any]) -> None:
    values = [f"v{i}" for i in range(len(labels))]
    answer = driven.run(
        op="metric", kind=kind, name=name, doc="fuzzed", labels=labels, values=values
    )
    driven.check_node()
    if answer["outcome"] != "ok":
        return
    # Taken: then it is a name Prometheus takes, and it shows on /metrics.
    assert isinstance(name, str) and PROMETHEUS_NAME.fullmatch(name), name
    for label in labels:
        assert isinstance(label, str) and PROMETHEUS_LABEL.fullmatch(label), label
        assert not label.startswith("__"), label
    if kind == "counter":
        sample = name.removesuffix("_total") + "_total"
    else:
        sample = name + ("_count" if kind == "histogram" else "")
    wanted = dict(zip(labels, values, strict=True))
    wait_for(
        lambda: wanted in user_samples(driven.check_node(), sample), 5, what=f"{sample} {wanted}"
    )


@API
@given(texts | not_strings, texts | not_strings)
def test_help_texts_and_label_values(driven: Driven, documentation: Any, value: Any) -> None:
    name = f"fuzz_text_{driven.commands_run}"
    answer = driven.run(
        op="metric", kind="gauge", name=name, doc=documentation, labels=["value"], values=[value]
    )
    driven.check_node()
    shown = str(value)
    # Any text is a valid help or label value but for lone surrogates, which
    # UTF-8 cannot carry; label values are coerced with str(), as
    # prometheus_client does, but a help text must be a str.
    if isinstance(documentation, str) and not has_lone_surrogate(documentation + shown):
        assert answer["outcome"] == "ok", answer
    else:
        assert answer["outcome"] == "refused", answer
        return

    # The text format's escapes: in HELP a backslash and a line feed, nothing
    # else. The line is compared as served, since prometheus_client's parser
    # strips the whitespace around a help text (Unicode's included).
    help_line = f"# HELP {name} " + documentation.replace("\\", "\\\\").replace("\n", "\\n")

    def round_trip() -> bool:
        text = driven.check_node()
        for family in text_string_to_metric_families(text):
            if family.name == name:
                assert help_line in text.split("\n"), (help_line, text[-2000:])
                labels = [s.labels["value"] for s in family.samples]
                assert labels == [shown], labels
                return True
        return False

    wait_for(round_trip, 5, what=f"{name} on /metrics")


def worker_step(driven: Driven) -> Any:
    return driven.node.sidecar.worker(driven.key)["step"]


@API
@given(
    st.integers()
    | st.integers(-(2**63) - 2, -(2**63) + 2)
    | st.integers(2**63 - 2, 2**63 + 2)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.text(max_size=10)
    | st.builds(lambda n: {"$index": n}, st.integers())
    | st.binary(max_size=4)
    | st.none()
)
def test_step_values(driven: Driven, value: Any) -> None:
    answer = driven.run(op="step", value=value)
    driven.check_node()
    number: int | None = None
    if isinstance(value, dict):
        number = value["$index"]
    elif isinstance(value, int) and not isinstance(value, bool):
        number = operator.index(value)
    in_range = number is not None and -(2**63) <= number < 2**63
    if value is None:
        assert answer["outcome"] == "ok", answer
        return
    assert answer["outcome"] == ("ok" if in_range else "refused"), (value, answer)
    if in_range:
        wait_for(lambda: worker_step(driven) == number, 5, what=f"step {number}")
    elif isinstance(value, float) and math.isnan(value):
        assert "nan" in answer["error"]


@API
@given(careless(st.from_regex(r"[a-z_]{1,12}", fullmatch=True)))
def test_handler_names(driven: Driven, name: Any) -> None:
    answer = driven.run(op="handler", name=name)
    driven.check_node()
    # A handler name is a URL path segment: no slash, no control character.
    takeable = (
        isinstance(name, str)
        and name
        and "/" not in name
        and not has_lone_surrogate(name)
        and not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name)
    )
    assert answer["outcome"] == ("ok" if takeable else "refused"), (name, answer)
    if not takeable:
        return
    side = driven.node.sidecar
    wait_for(lambda: name in side.worker(driven.key)["handlers"], 5, what=f"handler {name!r}")
    if name in (".", ".."):
        return  # a path segment HTTP clients resolve away before sending
    response = side.client.post(f"/api/v1/workers/0/handlers/{quote(name, safe='')}")
    assert (response.status_code, response.text) == (200, "echo"), (name, response.text)


BIG_BODIES = st.sampled_from([MAX_FRAME - 4096, MAX_FRAME, 2 * MAX_FRAME]).map(lambda n: b"x" * n)
statuses = (
    st.integers(-10, 1000)
    | st.sampled_from([100, 101, 199, 200, 204, 205, 304, 404, 500, 599, 600])
    | st.booleans()
    | st.none()
    | st.text(max_size=3)
    | st.floats()
)
content_types = (
    st.text(any_char, max_size=30)
    | st.sampled_from(["text/plain", "application/json", "text/html\r\nX-Injected: 1", ""])
    | st.none()
    | st.integers()
)
bodies = (
    st.binary(max_size=300)
    | st.text(any_char, max_size=100)
    | st.none()
    | st.integers()
    | st.lists(st.integers(), max_size=3)
)


@API
@given(bodies | BIG_BODIES, statuses, content_types, st.booleans() | st.just(False))
def test_reply_bodies(driven: Driven, body: Any, status: Any, content_type: Any, raw: bool) -> None:
    driven.run(op="reply", body=body, status=status, content_type=content_type, raw=raw)
    side = driven.node.sidecar
    response = side.client.post("/api/v1/workers/0/handlers/fuzz_reply?timeout=20", timeout=30)
    driven.check_node()
    assert response.status_code not in (503, 504), response.text
    if raw:
        assert response.status_code == 500, response.text
        assert "not a Response" in response.text
        return
    sendable = (
        isinstance(status, int)
        and not isinstance(status, bool)
        and 100 <= status <= 599
        and isinstance(content_type, str)
        and not has_lone_surrogate(content_type)
        and (isinstance(body, bytes) or (isinstance(body, str) and not has_lone_surrogate(body)))
    )
    if not sendable:
        assert response.status_code == 500, (body, status, content_type, response.text)
        return
    data = body.encode() if isinstance(body, str) else body
    header_safe = all(c == "\t" or " " <= c <= "~" for c in content_type)
    # Over the frame limit, or near it with the header: the worker says so itself.
    if len(data) > MAX_FRAME:
        assert response.status_code == 413, response.text
        return
    if len(data) > MAX_FRAME - 4096 and response.status_code == 413:
        return
    if not (status >= 200 and header_safe):
        assert response.status_code == 502, response.text
        return
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == content_type.strip(" \t")
    assert response.content == (b"" if status in (204, 205, 304) else data)


# -- exception messages: one worker per example, each ending with it -------------------------

messages = (
    st.text(any_char, max_size=200)
    | st.sampled_from(["", "\udc80", "a\udc80b" * 3000, "\n" * 5000, "é" * 4097])
    | st.builds(lambda c, n: c * n, any_char, st.sampled_from([4095, 4096, 4097, 1_100_000]))
)


@pytest.fixture(scope="module")
def ending(node: Node) -> Iterator[Driven]:
    worker = Driven(node, "exits", rank=100_000)
    yield worker
    worker.stop()


@API
@given(messages)
def test_exception_messages(node: Node, ending: Driven, message: str) -> None:
    rank = 100_001 + ending.commands_run
    ending.run(op="raise", rank=rank, message=message)
    side = node.sidecar
    worker = wait_for(
        lambda: (w := side.worker(str(rank))) and w["state"] != "running" and w, 10, what="its end"
    )
    assert worker["state"] == "exited", worker
    # The sidecar keeps the type and the start of the message, lone surrogates escaped.
    expected = message.encode("utf-8", "backslashreplace").decode()[: protocol.MAX_EXIT_TEXT]
    assert worker["exit"]["exc_type"] == "FuzzError"
    assert worker["exit"]["exc_message"] == expected
    recent = side.client.get("/api/v1/events?limit=20").json()["events"]
    assert not [e for e in recent if e["kind"] == "frame_rejected"], recent


def test_sidecar_log_has_no_unhandled_errors(node: Node) -> None:
    """Runs last in this module: nothing the fuzzers passed escaped as a traceback."""
    time.sleep(0.2)
    log = Path(node.sidecar.log_path).read_text(errors="replace")
    assert "Traceback" not in log, log[-5000:]
