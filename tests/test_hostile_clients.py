"""Hostile and careless HTTP clients: slow headers, too many connections, uvicorn's hooks.

500 connections that send their headers a byte at a time must not stop
/metrics or a relayed call; each is answered 408 and closed once its head
takes longer than --header-timeout; beyond --max-connections a connection is
answered 503 at once. Loopback only, bounded in count and time. The figures
are in docs/reliability.md.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import pytest
from conftest import SidecarProcess
from scrape import check_scrapes

from sidecar.http import limits

SLOW_CLIENTS = 500
HEADER_TIMEOUT = 3.0

# Opens N connections, sends each a request line, then one header byte per
# connection every DRIP seconds; records when and how each was answered.
SLOWLORIS = r"""
import json, selectors, socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
seconds, drip = float(sys.argv[3]), float(sys.argv[4])
sel = selectors.DefaultSelector()
opened = {}
for i in range(count):
    s = socket.create_connection(("127.0.0.1", port))
    s.setblocking(False)
    s.send(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    opened[s] = time.monotonic()
    sel.register(s, selectors.EVENT_READ)
answers = {}
deadline = time.monotonic() + seconds
next_drip = time.monotonic()
while time.monotonic() < deadline and len(answers) < count:
    now = time.monotonic()
    if now >= next_drip:
        for s in opened:
            if s not in answers:
                try:
                    s.send(b"a")
                except OSError:
                    pass
        next_drip = now + drip
    for key, _ in sel.select(timeout=0.05):
        s = key.fileobj
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        answers[s] = (data.split(b"\r\n", 1)[0].decode(), time.monotonic() - opened[s])
        sel.unregister(s)
statuses = {}
for line, _ in answers.values():
    statuses[line] = statuses.get(line, 0) + 1
print(json.dumps({"answered": len(answers), "statuses": statuses,
                  "open_for": sorted(t for _, t in answers.values())}))
"""


def timed_get(
    sidecar: SidecarProcess, path: str, method: str = "GET", texts: list[str] | None = None
) -> float:
    """Milliseconds for one 200 answer; its text kept in ``texts``, for checking after."""
    start = time.perf_counter()
    response = sidecar.client.request(method, path)
    elapsed = (time.perf_counter() - start) * 1000
    assert response.status_code == 200, response.text
    if texts is not None:
        texts.append(response.text)
    return elapsed


def p99(samples: list[float]) -> float:
    return sorted(samples)[int(0.99 * len(samples))]


def test_slow_headers_do_not_stop_metrics_or_calls_and_are_timed_out(
    sidecar_factory: Any, spawn_worker: Any
) -> None:
    sidecar = sidecar_factory("--header-timeout", str(HEADER_TIMEOUT))
    spawn_worker("train_loop.py", rank=0)
    sidecar.wait_workers(1)
    scraped: list[str] = []
    before = [timed_get(sidecar, "/metrics", texts=scraped) for _ in range(100)]

    attack = subprocess.Popen(
        [sys.executable, "-c", SLOWLORIS, str(sidecar.port), str(SLOW_CLIENTS),
         str(HEADER_TIMEOUT + 5), "0.2"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # all 500 open and dripping
        during: list[float] = []
        calls: list[float] = []
        started = time.monotonic()
        while time.monotonic() - started < HEADER_TIMEOUT - 1.2:
            during.append(timed_get(sidecar, "/metrics", texts=scraped))
            calls.append(timed_get(sidecar, "/api/v1/workers/0/handlers/ping", "POST"))
        out, _ = attack.communicate(timeout=60)
    finally:
        attack.kill()
    result = json.loads(out)
    print(
        f"/metrics before: median {statistics.median(before):.1f} ms, p99 {p99(before):.1f} ms; "
        f"under {SLOW_CLIENTS} slow clients: median {statistics.median(during):.1f} ms, "
        f"p99 {p99(during):.1f} ms ({len(during)} scrapes); ping p99 {p99(calls):.1f} ms; "
        f"slow clients answered {result['statuses']}, after "
        f"{result['open_for'][0]:.2f}-{result['open_for'][-1]:.2f} s"
    )
    assert len(during) >= 20
    assert p99(during) < max(100.0, 5 * p99(before))
    assert p99(calls) < 100.0
    # Every slow client was answered 408 and cut off once its head took too long.
    assert result["statuses"] == {"HTTP/1.1 408 Request Timeout": SLOW_CLIENTS}
    assert result["open_for"][0] >= HEADER_TIMEOUT - 0.1
    assert result["open_for"][-1] < HEADER_TIMEOUT + 2.0
    assert timed_get(sidecar, "/metrics", texts=scraped) > 0  # and the sidecar serves on
    # Checked after the timing: promtool takes tens of milliseconds a scrape.
    check_scrapes(scraped)


def test_connections_beyond_the_cap_are_answered_503_at_once(sidecar_factory: Any) -> None:
    sidecar = sidecar_factory("--max-connections", "20")
    held = [socket.create_connection(("127.0.0.1", sidecar.port)) for _ in range(20)]
    try:
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", sidecar.port), timeout=5)
        start = time.monotonic()
        answer = extra.recv(4096)
        assert time.monotonic() - start < 1.0
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable")
        assert b"--max-connections" in answer
        assert extra.recv(4096) == b""  # and closed
        extra.close()
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert sidecar.client.get("/healthz").status_code == 200


def test_uvicorn_still_has_the_hooks_the_limits_override() -> None:
    """Fails loudly on a uvicorn whose private HttpToolsProtocol moved: update limits.py."""
    limits.check_uvicorn()

    class Moved(limits.HttpToolsProtocol):
        on_response_complete = None  # type: ignore[assignment]

    original = limits.HttpToolsProtocol
    limits.HttpToolsProtocol = Moved  # type: ignore[misc]
    try:
        with pytest.raises(RuntimeError, match=r"changed HttpToolsProtocol.*on_response_complete"):
            limits.check_uvicorn()
    finally:
        limits.HttpToolsProtocol = original  # type: ignore[misc]
