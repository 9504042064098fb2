"""HTTP clients of one sidecar's API, on httpx, and the errors they raise.

``Client`` blocks (``httpx.Client``): the ``rankside`` commands use it.
``AsyncClient`` awaits (``httpx.AsyncClient``): a sidecar asks its job's other
sidecars with it, from its job routes, on its event loop. ``Peers`` is the one
``httpx.AsyncClient`` a sidecar holds for that, with its bounds. Both clients
build requests and read answers the same way (``_Endpoint``) and answer with
``sidecar.schema.Reply``.

Every failure is a ``ClientError``, as every httpx failure is an
``httpx.HTTPError``; its subclasses say which kind (no answer, a refused token,
a status that is not 200, an answer that is not a sidecar's), and its message
says what went wrong and what to do.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

from sidecar.client.sse import EventStream, events_of
from sidecar.schema import Reply
from sidecar.tokens import TokenError, read_token

DEFAULT_URL = "http://127.0.0.1:9478"
DEFAULT_TIMEOUT = 10.0
# At most this many requests to other sidecars at once; past that they queue.
MAX_PARALLEL = 32
# A sidecar's server (uvicorn) closes a connection idle for 5 s, httpx's own
# expiry: a request sent on one idle that long races the close and gets no
# answer. Idle connections are dropped well before, and a new one opened.
KEEPALIVE_EXPIRY = 2.0
# The event stream sends a keep-alive every 15 s; a read that waits well past
# that means the connection is gone.
STREAM_READ_TIMEOUT = 45.0
EVENT_STREAM = "/api/v1/events/stream"
USER_AGENT = "rankside"

Params = Sequence[tuple[str, str]]


# -- errors -------------------------------------------------------------------------


class ClientError(Exception):
    """A request that failed; the message says what went wrong and what to do."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransportError(ClientError):
    """No answer at all: the sidecar could not be reached, or the connection broke."""


class ConnectError(TransportError):
    """No connection to the sidecar (refused, no route, a name that does not resolve)."""


class Timeout(TransportError):
    """The sidecar did not answer in time."""


class AuthError(ClientError):
    """The sidecar wants a token (401): none was sent, or it refused the one sent."""


class StatusError(ClientError):
    """An answer whose status is not the one the request needs; ``reply`` is that answer."""

    def __init__(self, message: str, reply: Reply) -> None:
        super().__init__(message, reply.status)
        self.reply = reply


class AnswerError(ClientError):
    """An answer that is not what a sidecar sends (not JSON, another shape)."""


class TokenFileError(ClientError):
    """The token file given to the client cannot be used."""


# -- tokens -------------------------------------------------------------------------


def token_from(explicit: str | None, path: str | None) -> str | None:
    """The token to send: ``--token``/RANKSIDE_TOKEN, else the token file's, read as
    the sidecar reads its own (sidecar/tokens.py)."""
    if explicit:
        return explicit.strip()
    if path:
        try:
            return read_token(path, warn_if_shared=False)
        except TokenError as exc:
            raise TokenFileError(str(exc)) from None
    return None


# -- one sidecar --------------------------------------------------------------------


class _Endpoint:
    """What both clients share: one sidecar's URL and token, requests and errors."""

    def __init__(self, url: str, token: str | None, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        # The token goes in a header, never in a URL: URLs end up in logs.
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return {**headers, **(extra or {})}

    def _reply(self, response: httpx.Response) -> Reply:
        """The answer as a Reply; a 401 raises AuthError, whose message says what to do."""
        if response.status_code == 401:
            raise self._auth_error(response.headers.get("www-authenticate", ""))
        return Reply(
            response.status_code, response.headers.get("content-type", ""), response.content
        )

    def _json(self, path: str, reply: Reply) -> Any:
        if reply.status != 200:
            raise StatusError(f"{self.url}{path}: HTTP {reply.status}: {reply.error_text()}", reply)
        try:
            return reply.json()
        except ValueError:
            raise AnswerError(f"{self.url}{path} did not answer JSON: is it a sidecar?") from None

    def _auth_error(self, challenge: str) -> AuthError:
        if "invalid_token" in challenge:
            return AuthError(
                f"{self.url} refused the token: check --token, RANKSIDE_TOKEN or "
                "RANKSIDE_TOKEN_FILE against the file the sidecar reads (--token-file)",
                401,
            )
        return AuthError(
            f"{self.url} requires a token: pass --token, or set RANKSIDE_TOKEN or "
            "RANKSIDE_TOKEN_FILE",
            401,
        )

    def _failure(self, exc: Exception, timeout: float) -> ClientError:
        """The ClientError for an httpx error (or a deadline) on a request to this sidecar."""
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, httpx.TimeoutException | asyncio.TimeoutError):
            return Timeout(f"no answer from {self.url} within {timeout:g} s")
        if isinstance(exc, httpx.ConnectError):
            return ConnectError(f"cannot reach {self.url}: {reason}")
        if isinstance(exc, httpx.DecodingError):
            return AnswerError(f"{self.url} sent an answer that does not decode: {reason}")
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
            return ClientError(f"{self.url} is not a URL to reach a sidecar at: {reason}")
        if isinstance(exc, httpx.TransportError):
            return TransportError(f"lost the connection to {self.url}: {reason}")
        return ClientError(f"request to {self.url} failed: {reason}")


def http_client(timeout: float = DEFAULT_TIMEOUT) -> httpx.Client:
    """An ``httpx.Client`` as the command line uses one: safe to share between threads."""
    return httpx.Client(
        timeout=timeout,
        headers={"User-Agent": USER_AGENT},
        # The same race as Peers': `top --interval 5` would reuse connections
        # just as the sidecar closes them.
        limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY),
    )


class Client(_Endpoint):
    """One sidecar at ``url``, blocking; ``token`` goes in an Authorization header.

    ``http`` may be shared by the clients of several sidecars (one connection
    pool for a whole command); without one the client opens its own, which
    ``close`` closes.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        http: httpx.Client | None = None,
    ) -> None:
        super().__init__(url, token, timeout)
        self._owns_http = http is None
        self.http = http if http is not None else http_client(timeout)

    def close(self) -> None:
        if self._owns_http:
            self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        params: Params = (),
        body: bytes | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Any answer but 401 is returned; no answer, or a 401, raises ClientError."""
        wait = timeout or self.timeout
        try:
            response = self.http.request(
                method,
                self.url + path,
                params=list(params) or None,
                content=body,
                headers=self._headers(),
                timeout=wait,
            )
        except httpx.HTTPError as exc:
            raise self._failure(exc, wait) from None
        return self._reply(response)

    def get_json(self, path: str, params: Params = ()) -> Any:
        """GET ``path`` and decode its JSON; anything but 200 raises ClientError."""
        return self._json(path, self.request("GET", path, params))

    def post_json(self, path: str, params: Params = ()) -> Any:
        """POST to ``path`` and decode its JSON; anything but 200 raises ClientError."""
        return self._json(path, self.request("POST", path, params))

    def events(self, stream: EventStream | None = None) -> Iterator[dict[str, Any]]:
        """Follow ``/api/v1/events/stream``: each event's JSON as it comes, until it ends.

        ``stream`` carries the stream's state from one connection to the next:
        the id of the last event (sent as Last-Event-ID, so the sidecar replays
        what came after it) and the reconnection delay the sidecar asked for.
        """
        stream = stream if stream is not None else EventStream()
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
        if stream.last_event_id:
            headers["Last-Event-ID"] = stream.last_event_id
        timeout = httpx.Timeout(self.timeout, read=max(self.timeout, STREAM_READ_TIMEOUT))
        try:
            with self.http.stream(
                "GET", self.url + EVENT_STREAM, headers=self._headers(headers), timeout=timeout
            ) as response:
                if response.status_code != 200:
                    response.read()
                    reply = self._reply(response)
                    raise StatusError(f"{self.url}{EVENT_STREAM}: HTTP {reply.status}", reply)
                for event in events_of(stream, response.iter_bytes()):
                    try:
                        data: dict[str, Any] = json.loads(event.data)
                    except ValueError:
                        raise AnswerError(
                            f"{self.url}{EVENT_STREAM} sent an event that is not JSON"
                        ) from None
                    yield data
        except httpx.HTTPError as exc:
            waited = self.timeout if isinstance(exc, httpx.ConnectTimeout) else timeout.read
            raise self._failure(exc, waited or STREAM_READ_TIMEOUT) from None
        except ValueError as exc:  # a line past the reader's limit
            raise AnswerError(f"{self.url}{EVENT_STREAM}: {exc}") from None


# -- a sidecar's peers --------------------------------------------------------------


class AsyncClient(_Endpoint):
    """One sidecar at ``url``, awaited, through a shared ``httpx.AsyncClient``.

    Each request waits its turn under ``limit`` (the bound on requests in
    flight), then gets at most ``timeout`` seconds in all, connecting, sending
    and reading included: a node that accepts and never answers costs that
    much once, and holds nothing up but the requests waiting on it.
    """

    def __init__(
        self,
        url: str,
        http: httpx.AsyncClient,
        limit: asyncio.Semaphore,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(url, token, timeout)
        self.http = http
        self.limit = limit

    async def request(
        self,
        method: str,
        path: str,
        params: Params = (),
        body: bytes | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Any answer but 401 is returned; no answer, or a 401, raises ClientError."""
        wait = timeout or self.timeout
        async with self.limit:
            try:
                response = await asyncio.wait_for(
                    self.http.request(
                        method,
                        self.url + path,
                        params=list(params) or None,
                        content=body,
                        headers=self._headers(),
                        timeout=wait,
                    ),
                    wait,
                )
            except (TimeoutError, httpx.HTTPError) as exc:
                raise self._failure(exc, wait) from None
        return self._reply(response)

    async def get_json(self, path: str, params: Params = ()) -> Any:
        """GET ``path`` and decode its JSON; anything but 200 raises ClientError."""
        return self._json(path, await self.request("GET", path, params))


class Peers:
    """The other sidecars of a job, as one sidecar asks them: one ``httpx.AsyncClient``.

    Opened with the sidecar's app and closed with it (sidecar/http/app.py). At
    most ``max_parallel`` requests are in flight at once, over at most as many
    connections, each kept alive for ``KEEPALIVE_EXPIRY`` seconds once idle.
    """

    def __init__(self, token: str | None, timeout: float, max_parallel: int = MAX_PARALLEL) -> None:
        self.token = token
        self.timeout = timeout
        self.limit = asyncio.Semaphore(max_parallel)
        self.http = httpx.AsyncClient(
            timeout=timeout,
            limits=httpx.Limits(
                max_connections=max_parallel,
                max_keepalive_connections=max_parallel,
                keepalive_expiry=KEEPALIVE_EXPIRY,
            ),
            headers={"User-Agent": USER_AGENT},
        )

    def client(self, url: str) -> AsyncClient:
        return AsyncClient(url, self.http, self.limit, self.token, self.timeout)

    async def aclose(self) -> None:
        await self.http.aclose()
