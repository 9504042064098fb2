"""The worker's link to the node sidecar, run by one background daemon thread.

The thread connects to the sidecar's unix socket, says ``hello``, then sends a
heartbeat every interval and answers the ``call`` frames that come back.
Handlers run on a few daemon threads of their own so that a slow one delays no
heartbeat; the quick built-ins (``ping``, ``dump_traceback``) run on the
connection thread itself, without that hand-off. When the sidecar is missing
or goes away the thread retries with capped exponential backoff (``Backoff``).
The training thread never touches the socket: at exit it asks the connection
thread to send the last heartbeat, metrics and ``bye``, and waits for that at
most :data:`BYE_TIMEOUT`. Every send is bounded by a timeout too, so a sidecar
that stops reading blocks no thread for ever.

User-supplied values (handler names, the identity from the environment,
exception texts) enter frames in one place, ``_encode``: a frame the sidecar
would refuse is repaired or dropped there, with a warning once, and nothing a
training script passes in ends the connection thread.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

# Importing builtin_handlers registers the built-in handlers, which this
# connection serves: whatever serves handlers has them.
from . import builtin_handlers, handlers, metrics, protocol, torch_bridge  # noqa: F401
from .collectives import CollectiveProgress
from .identity import Identity
from .progress import PROGRESS

log = logging.getLogger("rankside.worker")

FIRST_RETRY = 0.05
MAX_RETRY = 2.0
# A session shorter than this after its welcome does not reset the backoff: a
# sidecar that welcomes a worker and then refuses its frames is not hammered.
STABLE_SESSION = 5.0
# How long the worker waits for ``welcome`` after its ``hello``.
WELCOME_TIMEOUT = 10.0
# Bytes a metrics frame's header takes beside its body, with room to spare.
METRICS_HEADER_ROOM = 64
HANDLER_THREADS = 4
# How often the connection thread looks for new handlers (torch's included).
HANDLER_POLL_INTERVAL = 0.25
# How long the training thread waits at exit, in all, for the goodbye to go out.
BYE_TIMEOUT = 1.0
# The longest one frame may take to go out. A sidecar that reads nothing for so
# long is treated as gone (it drops a worker silent for as long, too).
SEND_TIMEOUT = 10.0


def _env_float(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        log.warning("rankside: ignoring %s=%r, not a number", name, os.environ.get(name))
        return default
    return value if value > 0 else default


class Backoff:
    """The one reconnect policy: capped exponential, reset only by a stable session.

    Every failed attempt (no socket, refused before its welcome, or a session
    that ended within STABLE_SESSION of its welcome) doubles the wait, from
    FIRST_RETRY to MAX_RETRY; a session that lasted longer starts it over.
    """

    def __init__(self) -> None:
        self.delay = FIRST_RETRY

    def next_delay(self) -> float:
        """The wait before the next attempt; the one after it doubles."""
        delay = self.delay
        self.delay = min(delay * 2, MAX_RETRY)
        return delay

    def session_ended(self, welcomed_for: float | None) -> None:
        """A session ended ``welcomed_for`` seconds after its welcome (None: never welcomed)."""
        if welcomed_for is not None and welcomed_for >= STABLE_SESSION:
            self.delay = FIRST_RETRY


class FrameBuffer:
    """Accumulates bytes from a stream and cuts them into frames."""

    def __init__(self, max_frame: int = protocol.DEFAULT_MAX_FRAME) -> None:
        self._data = bytearray()
        self._max_frame = max_frame

    def feed(self, chunk: bytes) -> list[tuple[protocol.Header, bytes]]:
        frames: list[tuple[protocol.Header, bytes]] = []
        if self._data:
            self._data += chunk
            del self._data[: _cut_frames(self._data, self._max_frame, frames)]
        else:
            # Most chunks hold whole frames (a call, as one send): cut them
            # from the chunk itself, and keep only what is left of it.
            self._data += chunk[_cut_frames(chunk, self._max_frame, frames) :]
        return frames


def _cut_frames(
    data: bytes | bytearray, max_frame: int, frames: list[tuple[protocol.Header, bytes]]
) -> int:
    """Append the whole frames at the start of ``data`` to ``frames``; the bytes they took."""
    offset = 0
    while (cut := protocol.cut_frame(data, offset, max_frame)) is not None:
        header, body, offset = cut
        frames.append((header, body))
    return offset


class HandlerPool:
    """A few daemon threads that run handler calls.

    Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so a
    hung handler would keep a finished training process alive.
    """

    def __init__(self, threads: int = HANDLER_THREADS) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._threads = threads
        self._started = False
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if not self._started:
                for i in range(self._threads):
                    threading.Thread(
                        target=self._run, name=f"rankside-handler-{i}", daemon=True
                    ).start()
                self._started = True
        self._queue.put(job)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                job()
            except Exception:
                log.exception("rankside: handler job failed")


class Connection:
    """Keeps this worker registered with the sidecar at ``path``."""

    def __init__(self, path: str, identity: Identity) -> None:
        self.path = path
        self.identity = identity
        self.heartbeat_interval = _env_float("RANKSIDE_HEARTBEAT_INTERVAL", 1.0)
        # How often a heartbeat also carries the collectives' arrival times, in seconds.
        self.lag_interval = _env_float("RANKSIDE_LAG_INTERVAL", 30.0)
        self.flush_interval = _env_float("RANKSIDE_FLUSH_INTERVAL", 1.0)
        self.key: str | None = None
        self._stop = threading.Event()
        self._send_lock = threading.Lock()
        # The socket handler threads reply on: set only once ``hello`` is out,
        # since the sidecar refuses a connection whose first frame is another.
        self._sock: socket.socket | None = None
        # The socket of the session in progress, from connect to close.
        self._session_sock: socket.socket | None = None
        # close() wakes the connection thread's select() through this pair.
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._wake_send.setblocking(False)
        # What close() asks the connection thread to say, and by when.
        self._bye: dict[str, Any] | None = None
        self._bye_deadline = 0.0
        self._pool = HandlerPool()
        self._thread = threading.Thread(target=self._run, name="rankside-connection", daemon=True)
        self._connected = threading.Event()
        self._torch_sync_failed = False
        self._collectives = CollectiveProgress()
        # The sidecar's frame limit, from its welcome.
        self._max_frame = protocol.DEFAULT_MAX_FRAME
        self._welcomed_at: float | None = None
        # Frame types already warned about in _encode, and failures in _run.
        self._warned: set[str] = set()

    # -- lifecycle, called from the training thread --------------------------

    def start(self) -> None:
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """Wait until registered with the sidecar (tests and demos use this)."""
        return self._connected.wait(timeout)

    def close(self, bye: dict[str, Any] | None = None) -> None:
        """Stop the connection thread, which first says ``bye`` if connected.

        The connection thread sends the last heartbeat (the last steps may have
        come after the one before), the changed metrics and the bye, in that
        order. This waits for it at most BYE_TIMEOUT in all and never touches
        the socket itself; without a sidecar it returns at once.
        """
        deadline = time.monotonic() + BYE_TIMEOUT
        self._bye = bye
        self._bye_deadline = deadline
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_send.send(b"\0")
        if self._thread.ident is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if not self._thread.is_alive():
            self._wake_recv.close()
            self._wake_send.close()

    def after_fork_in_child(self) -> None:
        """A forked child (a DataLoader worker) must not speak on the parent's socket."""
        self._stop.set()
        sock = self._session_sock
        self._sock = self._session_sock = None
        # Closing only drops the child's copies; shutdown() would cut the parent off.
        if sock is not None:
            sock.close()
        self._wake_recv.close()
        self._wake_send.close()

    # -- the connection thread ----------------------------------------------

    def _run(self) -> None:
        backoff = Backoff()
        logged_missing = False
        refused = ""
        while not self._stop.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
            except OSError as exc:
                sock.close()
                if not logged_missing:
                    if isinstance(exc, PermissionError):
                        # Shown without any logging set up: the worker will never connect.
                        log.warning(
                            "rankside: may not connect to the sidecar at %s (%s): its socket is "
                            "mode 0600 unless the sidecar runs with --socket-group-access; run "
                            "this worker as the sidecar's user or group; retrying",
                            self.path,
                            exc,
                        )
                    else:
                        log.info(
                            "rankside: sidecar not reachable at %s (%s); retrying", self.path, exc
                        )
                    logged_missing = True
                self._stop.wait(backoff.next_delay())
                continue
            logged_missing = False
            # Non-blocking: every receive follows select(), and every send
            # waits in select() by its own deadline (_send_by). A socket with
            # a timeout would poll() before each recv and send, and each
            # settimeout() is an ioctl: syscalls, and GIL releases, per call.
            sock.setblocking(False)
            self._session_sock = sock
            try:
                self._session(sock)
            except (OSError, protocol.ProtocolError) as exc:
                if not self._connected.is_set() and isinstance(exc, protocol.ProtocolError):
                    # Refused before any welcome (peer uid, protocol version): say why,
                    # once per reason, where it shows without any logging set up.
                    if str(exc) != refused:
                        log.warning("rankside: %s; retrying", exc)
                    refused = str(exc)
                elif not self._stop.is_set():
                    log.info("rankside: lost the sidecar connection (%s); reconnecting", exc)
                else:
                    log.debug("rankside: could not say goodbye to the sidecar (%s)", exc)
            except Exception as exc:
                # A bug, or a user-supplied value _encode did not foresee: it
                # costs this session, never the connection thread for good.
                if type(exc).__name__ not in self._warned:
                    self._warned.add(type(exc).__name__)
                    log.warning(
                        "rankside: the sidecar connection failed (%s: %s); reconnecting",
                        type(exc).__name__,
                        exc,
                        exc_info=True,
                    )
            finally:
                # Only a session that was welcomed and then lasted resets the
                # backoff: a sidecar that refuses us (another protocol version,
                # frames it will not take) is not hammered.
                welcomed_at = self._welcomed_at
                backoff.session_ended(
                    None if welcomed_at is None else time.monotonic() - welcomed_at
                )
                self._welcomed_at = None
                self._connected.clear()
                self._sock = self._session_sock = None
                # shutdown() also wakes a handler thread blocked sending on it.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._stop.wait(backoff.next_delay())

    def _session(self, sock: socket.socket) -> None:
        frames = FrameBuffer()
        sent_generation = handlers.generation()
        hello: protocol.Header = {
            "type": "hello",
            "version": protocol.PROTOCOL_VERSION,
            "identity": self.identity.to_json(),
            "handlers": handlers.handler_names(),
        }
        self._max_frame = protocol.DEFAULT_MAX_FRAME
        self._send_now(sock, hello)
        # Handler threads may reply from now on, never before hello.
        self._sock = sock
        # The heartbeat goes with the hello, so the sidecar never lists a
        # reconnected worker without its progress; the first metrics payload
        # waits for the welcome, which says how big a frame the sidecar takes.
        self._send_now(sock, self._heartbeat())
        welcome_deadline = time.monotonic() + WELCOME_TIMEOUT
        while not self._connected.is_set() and not self._stop.is_set():
            timeout = welcome_deadline - time.monotonic()
            if timeout <= 0:
                raise TimeoutError(f"no welcome from the sidecar within {WELCOME_TIMEOUT:g} s")
            readable, _, _ = select.select([sock, self._wake_recv], [], [], timeout)
            if sock in readable:
                self._receive(sock, frames)
        # The steps taken while the welcome was on its way: without this
        # heartbeat the first payload's step durations would reach /metrics up
        # to a heartbeat before the step and progress time they belong with.
        self._send_now(sock, self._heartbeat())
        self._flush_metrics(sock, full=True)
        next_heartbeat = time.monotonic() + self.heartbeat_interval
        next_flush = time.monotonic() + self.flush_interval
        next_poll = time.monotonic()
        next_arrivals = self._next_arrivals_at()
        while not self._stop.is_set():
            soonest = min(next_heartbeat, next_flush, next_poll, next_arrivals)
            timeout = max(0.0, soonest - time.monotonic())
            readable, _, _ = select.select([sock, self._wake_recv], [], [], timeout)
            if self._stop.is_set():
                break
            if sock in readable:
                self._receive(sock, frames)
            now = time.monotonic()
            if now >= next_poll:
                # Torch's handlers appear when the script imports torch, and
                # handlers registered later must reach the sidecar within a second.
                self._sync_torch_handlers()
                next_poll = now + HANDLER_POLL_INTERVAL
            if handlers.generation() != sent_generation:
                sent_generation = handlers.generation()
                self._send_now(sock, {"type": "handlers", "names": handlers.handler_names()})
            if now >= next_heartbeat or now >= next_arrivals:
                with_arrivals = now >= next_arrivals
                self._send_now(sock, self._heartbeat(with_arrivals))
                next_heartbeat = now + self.heartbeat_interval
                if with_arrivals:
                    next_arrivals = self._next_arrivals_at()
            if now >= next_flush:
                self._flush_metrics(sock, full=False)
                next_flush = now + self.flush_interval
        self._say_goodbye(sock)

    def _receive(self, sock: socket.socket, frames: FrameBuffer) -> None:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            return  # nothing after all; select() says when there is
        if not chunk:
            raise ConnectionResetError("sidecar closed the connection")
        for header, body in frames.feed(chunk):
            self._on_frame(header, body)

    def _say_goodbye(self, sock: socket.socket) -> None:
        """Send what close() asked for, in order, by its deadline; raise if it cannot."""
        bye = self._bye
        if bye is None:
            return
        deadline = self._bye_deadline
        self._send_now(sock, self._heartbeat(), deadline=deadline)
        self._flush_metrics(sock, full=False, deadline=deadline)
        self._send_now(sock, {"type": "bye", **bye}, deadline=deadline)

    def _sync_torch_handlers(self) -> None:
        try:
            torch_bridge.sync()
        except Exception:
            if not self._torch_sync_failed:
                log.exception("rankside: could not list torch's control handlers")
            self._torch_sync_failed = True

    def _on_frame(self, header: protocol.Header, body: bytes) -> None:
        kind = header["type"]
        if kind == "welcome":
            self.key = header["key"]
            max_frame = header.get("max_frame")
            # An older sidecar sends none: its limit is then the default one.
            if isinstance(max_frame, int) and not isinstance(max_frame, bool) and max_frame > 0:
                self._max_frame = max_frame
            self._welcomed_at = time.monotonic()
            self._connected.set()
        elif kind == "call":
            call_id: int = header["id"]
            name: str = header["handler"]
            deadline: float = header["deadline"]
            request = handlers.Request(protocol.params_to_pairs(header["params"]), body)
            fn = handlers.quick_handler(name)
            if fn is not None:
                # Run here: the hand-off to a handler thread and back (two
                # wake-ups, each waiting for the GIL) was most of what a
                # relayed ping cost the worker, and a quick handler answers
                # even while every handler thread is busy or hung.
                self._answer(call_id, name, request, deadline, fn)
            else:
                self._pool.submit(lambda: self._answer(call_id, name, request, deadline))
        elif kind == "error":
            raise protocol.ProtocolError(f"sidecar refused us: {header['message']}")
        else:
            log.debug("rankside: ignoring %r frame from the sidecar", kind)

    # -- handler threads (and the connection thread, for quick handlers) -------

    def _answer(
        self,
        call_id: int,
        name: str,
        request: handlers.Request,
        deadline: float,
        fn: handlers.Handler | None = None,
    ) -> None:
        if time.time() > deadline:
            # Queued behind slow or hung handlers until the sidecar gave up on
            # it: nobody waits for the answer, so the handler is not run.
            log.debug("rankside: skipped call %s to %s, its deadline has passed", call_id, name)
            return
        response = handlers.dispatch(name, request, fn)
        try:
            frame = self._reply_frame(call_id, response)
        except protocol.FrameTooLarge as exc:
            # Over the sidecar's frame limit, which would close the whole
            # connection and fail every call in flight: this call alone fails.
            log.warning("rankside: handler %s: %s; answered 413", name, exc)
            text = f"Handler {name} failed: its reply is too big to send: {exc} (--max-frame)"
            frame = self._reply_frame(call_id, handlers.Response(text, 413))
        except Exception as exc:
            # dispatch() checks what a handler returns; should a reply still
            # not encode, the caller gets a 500 now rather than a 504 later.
            frame = self._reply_frame(call_id, handlers.failure(name, exc))
        sock = self._sock
        if sock is None:
            return
        with contextlib.suppress(OSError):
            self._send_frame(sock, frame)

    # -- shared --------------------------------------------------------------------

    def _next_arrivals_at(self) -> float:
        """When, on the monotonic clock, the next heartbeat carries arrivals.

        On the wall clock's multiples of ``lag_interval``: then every rank of a
        job, on every node, sends the arrivals of the same collectives at
        nearly the same moment (the clocks' agreement, plus the read of the
        flight recorder), so the newest arrivals the sidecars hold overlap.
        Sent on a timer of its own, a rank could be a whole interval ahead of
        another, with no collective in common in the windows weighed.
        """
        if self.lag_interval <= 0:
            return math.inf
        wall = time.time()
        boundary = (math.floor(wall / self.lag_interval) + 1) * self.lag_interval
        return time.monotonic() + (boundary - wall)

    def _heartbeat(self, with_arrivals: bool = False) -> protocol.Header:
        heartbeat: protocol.Header = {
            "type": "heartbeat",
            "step": PROGRESS.step,
            "steps": PROGRESS.steps,
            "progress_time": PROGRESS.progress_time,
        }
        # Read on every heartbeat: a rank that stops sending leaves its last
        # position with the sidecar, which is what names it in a hang.
        collectives = self._collectives.read()
        if collectives is not None:
            heartbeat["collectives"] = collectives
            arrivals = self._collectives.arrivals() if with_arrivals else None
            if arrivals is not None:
                heartbeat["arrivals"] = arrivals
        return heartbeat

    def _flush_metrics(
        self, sock: socket.socket, full: bool, deadline: float | None = None
    ) -> None:
        """Push the metric series that changed, or all of them when ``full``.

        Only the connection thread calls this, so payloads go out in the order
        they were collected. Values are cumulative, so a push lost with a broken
        connection costs nothing: the next session starts with a full one.
        """
        limit = self._max_frame - METRICS_HEADER_ROOM
        for body in metrics.REGISTRY.collect_payloads(full, limit):
            self._send_now(sock, {"type": "metrics"}, body, deadline=deadline)

    def _send_now(
        self,
        sock: socket.socket,
        header: protocol.Header,
        body: bytes = b"",
        deadline: float | None = None,
    ) -> None:
        frame = self._encode(header, body)
        if frame is not None:
            self._send_frame(sock, frame, deadline)

    def _encode(self, header: protocol.Header, body: bytes = b"") -> bytes | None:
        """``header`` and ``body`` as a frame the sidecar accepts, or None to send nothing.

        The one place where user-supplied values enter a frame. A header that
        will not encode (a lone surrogate, a value JSON cannot hold, NaN) is sent
        with the bad values escaped or dropped; a frame that still cannot go (a
        required field lost, over the frame limit) is dropped. Either warns
        once per frame type. ``hello`` must go, so its failure ends the session.
        """
        kind = str(header.get("type"))
        try:
            return protocol.encode_checked(header, body, self._max_frame)
        except (TypeError, ValueError) as exc:
            first_error = exc
        repaired = _json_safe(header)
        try:
            if not isinstance(repaired, dict) or any(
                field not in repaired for field in protocol.REQUIRED_FIELDS.get(kind, {})
            ):
                raise first_error
            frame = protocol.encode_checked(repaired, body, self._max_frame)
            what = "sent it with the bad values escaped or left out"
        except (TypeError, ValueError):
            if kind == "hello":
                raise protocol.ProtocolError(f"cannot say hello: {first_error}") from None
            frame, what = None, "dropped it"
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("rankside: a %s frame would be refused (%s); %s", kind, first_error, what)
        return frame

    def _reply_frame(self, call_id: int, response: handlers.Response) -> bytes:
        """The reply frame; FrameTooLarge when it is over the frame limit."""
        header = {
            "type": "reply",
            "id": call_id,
            "status": response.status,
            "content_type": response.content_type,
        }
        return protocol.encode_checked(header, response.body_bytes(), self._max_frame)

    def _send_frame(self, sock: socket.socket, frame: bytes, deadline: float | None = None) -> None:
        """Send one whole frame from any thread, by ``deadline`` (a monotonic time).

        Without a deadline the send may take SEND_TIMEOUT, and waiting for the
        lock is bounded too, as every holder is. Raises OSError (TimeoutError
        included) when the frame did not go out; one cut short leaves the stream
        unreadable, so the socket is shut down and the session ends.
        """
        if deadline is None:
            self._send_lock.acquire()
        elif not self._send_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError("another thread was still sending")
        try:
            limit = time.monotonic() + SEND_TIMEOUT
            if deadline is not None:
                if deadline <= time.monotonic():
                    raise TimeoutError("no time left to send")
                limit = min(limit, deadline)
            try:
                _send_by(sock, frame, limit)
            except OSError:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                raise
        finally:
            self._send_lock.release()


def _send_by(sock: socket.socket, data: bytes, limit: float) -> None:
    """All of ``data`` on the non-blocking ``sock`` by ``limit`` (a monotonic time).

    One send() when the socket has room, as it nearly always has; otherwise
    select() waits for room until ``limit``, then TimeoutError.
    """
    view = memoryview(data)
    while True:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            sent = 0
        if sent == len(view):
            return
        view = view[sent:]
        remaining = limit - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        select.select([], [sock], [], remaining)


def _json_safe(value: object) -> object:
    """``value`` with what a strict JSON header cannot carry escaped or left out.

    Strings with lone surrogates are escaped (backslashreplace); int-likes
    (numpy integers, 0-d tensors) become ints; NaN, out-of-range integers and
    other objects are left out of their list or object.
    """
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _LEFT_OUT
    if isinstance(value, dict):
        safe = {_json_safe(k): _json_safe(v) for k, v in value.items() if isinstance(k, str)}
        return {k: v for k, v in safe.items() if v is not _LEFT_OUT}
    if isinstance(value, (list, tuple)):
        return [v for v in map(_json_safe, value) if v is not _LEFT_OUT]
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return _LEFT_OUT
    return number if -protocol.INT_LIMIT <= number < protocol.INT_LIMIT else _LEFT_OUT


_LEFT_OUT = object()
