"""A small HTTP/1.1 server on ``asyncio.Protocol`` and llhttp (``httptools``),
built for a forward proxy.

ASGI servers cannot tunnel ``CONNECT`` and buffer in places a proxy must
not, so the sidecar speaks HTTP itself: keep-alive and pipelining, streamed
response bodies (each chunk written as it comes — no buffering, no read
timeout on an open stream), ``CONNECT`` tunnels, absolute-form targets, a
body limit (413), and a graceful drain: ``close()`` stops accepting, lets
in-flight requests finish, then closes idle connections.

The handler is *sync-first*: it returns the ``Response`` (or ``Tunnel``) when
it can answer at once — a denial, ``/health`` — and an awaitable only when it
must wait (an upstream call, a commit). An answer given at once is written
from the protocol callback itself: no task, and the answers to pipelined
requests that arrived together leave in one ``write``. Requests on one
connection are answered in order, one at a time.

Anything llhttp cannot parse is answered 400 and the connection closed; so is
an HTTP/1.1 request without exactly one ``Host`` header (as h11 did).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import cast

import httptools

log = logging.getLogger("agentmesh.sidecar.http")

MAX_BODY = 4 * 1024 * 1024
MAX_HEAD = 64 * 1024  # request line and headers
_PIPELINED = 32  # queued requests on one connection before it stops reading
_HIGH_WATER = 256 * 1024  # a tunnel's unsent bytes before the other side stops reading
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


@dataclass(slots=True)
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(slots=True)
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | AsyncIterator[bytes] = b""


@dataclass(slots=True)
class Tunnel:
    """Answer a CONNECT by piping bytes to ``host:port``."""

    host: str
    port: int


Outcome = Response | Tunnel
# Sync-first: the outcome now, or an awaitable of it (an asyncio.Future is answered from
# its done callback, without a task, when it resolves to a complete Response).
Handler = Callable[[Request], Outcome | Awaitable[Outcome]]

_INTERNAL = Response(
    502,
    [("content-type", "application/problem+json")],
    b'{"type":"https://agentmesh.dev/problems/internal","title":'
    b'"Sidecar error","status":502,"detail":"see the sidecar logs"}',
)


class _TooLarge(Exception):
    pass


class _BadHead(Exception):
    pass


def _head(status: int, headers: list[tuple[str, str]], framing: bytes) -> bytes:
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
    for key, value in headers:
        if "\r" in value or "\n" in value or "\r" in key or "\n" in key:
            continue  # never let a value split the head
        lines.append(f"{key}: {value}\r\n".encode("latin-1", "replace"))
    lines.append(framing)
    return b"".join(lines)


def encode_response(response: Response, head_only: bool = False) -> bytes:
    """A complete response with a bytes body: head and body in one buffer."""
    body = response.body
    assert isinstance(body, bytes)
    headers = [(k, v) for k, v in response.headers if k.lower() != "content-length"]
    if response.status in (204, 304) or response.status < 200:
        return _head(response.status, headers, b"\r\n")
    framing = b"content-length: %d\r\n\r\n" % len(body)
    head = _head(response.status, headers, framing)
    return head if head_only else head + body


class _Connection(asyncio.Protocol):
    """One client connection: parse, answer in order, keep alive."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[tuple[Request, bool]] = deque()  # request, keep-alive
        self.busy = False  # a request is being answered by a task
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.reading = True
        self.tunnel: asyncio.Transport | None = None
        self.leftover = b""
        self._out: list[bytes] = []
        self._writable: asyncio.Future[None] | None = None
        self._paused = False
        self.closed_after = False  # the client half-closed: close once answered
        # the request being parsed
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._head_size = 0
        self._upgrade = False

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._connections.discard(self)
        self.queue.clear()
        if self.tunnel is not None:
            self.tunnel.close()
        waiter = self._writable
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("the client closed the connection"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        if self.tunnel is not None:
            if self.tunnel.can_write_eof():
                self.tunnel.write_eof()
            return True  # half-open: the other direction may still carry data
        if not self.busy and not self.queue:
            return False  # closes the connection
        self.closed_after = True
        return True

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self._upgrade:
            self.leftover += data  # after a CONNECT head, until the tunnel is open
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.leftover = data[exc.args[0] :]
            self._upgrade = True
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _TooLarge):
                self._refuse(_too_large(self.server.max_body))
            else:
                self._refuse(_bad_request(str(cause) if cause else "bad request"))
            return
        except httptools.HttpParserError as exc:
            self._refuse(_bad_request(str(exc)))
            return
        if self.queue and not self.busy:
            self._pump()
        if self.reading and len(self.queue) >= _PIPELINED and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()

    # -- llhttp callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = []
        self._size = 0
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > MAX_HEAD:
            raise _BadHead("request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value)
        if self._head_size > MAX_HEAD:
            raise _BadHead("request head too large")
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1").strip()))

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.server.max_body:
            raise _TooLarge
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        method = parser.get_method().decode("ascii")
        if parser.get_http_version() == "1.1":
            hosts = sum(1 for k, _ in self._headers if k == "host")
            if hosts != 1:
                raise _BadHead("missing Host header" if hosts == 0 else "more than one Host header")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = Request(method, self._url.decode("latin-1"), self._headers, body)
        self.queue.append((request, parser.should_keep_alive()))

    # -- answering ---------------------------------------------------------------------

    def _pump(self) -> None:
        """Answer queued requests in order: at once while the handler can, in a task
        from the first one that must wait."""
        out = self._out
        server = self.server
        while self.queue and not self.busy and not self.closed:
            request, keep = self.queue.popleft()
            counted = not _is_listen_stream(request)
            if counted:
                server._busy += 1
            try:
                outcome = server.handler(request)
            except Exception:
                log.exception("handler_failed")
                outcome = _INTERNAL
            if isinstance(outcome, Response) and isinstance(outcome.body, bytes):
                if counted:
                    server._busy -= 1
                out.append(encode_response(outcome, request.method == "HEAD"))
                if not keep or server._closing or _closes(outcome) or self._upgrade:
                    self._flush()
                    self._close()
                    return
                continue
            self.busy = True
            self._flush()
            if isinstance(outcome, asyncio.Future):
                # Answered by a callback (a relayed JSON call): no task unless it streams.
                outcome.add_done_callback(functools.partial(self._settled, request, keep, counted))
                break
            # Held here: the loop keeps only a weak reference to a task.
            self.task = asyncio.get_running_loop().create_task(
                self._answer(request, keep, outcome, counted)
            )
        self._flush()
        if not self.reading and not self.closed and self.transport is not None:
            self.reading = True
            self.transport.resume_reading()
        if self.closed_after and not self.busy and not self.queue:
            self._close()

    def _settled(
        self, request: Request, keep: bool, counted: bool, done: asyncio.Future[Outcome]
    ) -> None:
        """A future outcome is there: a complete answer is written now, anything else
        (a stream, a tunnel, an error) goes on in a task."""
        try:
            outcome: Outcome = done.result()
        except Exception:
            log.exception("handler_failed")
            outcome = _INTERNAL
        if not (isinstance(outcome, Response) and isinstance(outcome.body, bytes)):
            self.task = asyncio.get_running_loop().create_task(
                self._answer(request, keep, outcome, counted)
            )
            return
        if counted:
            self.server._busy -= 1
        self.busy = False
        if self.closed:
            return
        self._out.append(encode_response(outcome, request.method == "HEAD"))
        if not keep or self.server._closing or _closes(outcome) or self._upgrade:
            self._flush()
            self._close()
            return
        self._pump()

    def _flush(self) -> None:
        if self._out and self.transport is not None and not self.closed:
            data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
            self._out.clear()
            self.transport.write(data)
        else:
            self._out.clear()

    async def _answer(self, request: Request, keep: bool, outcome: object, counted: bool) -> None:
        try:
            try:
                if not isinstance(outcome, Response | Tunnel):
                    outcome = await outcome  # type: ignore[misc]
            except Exception:
                log.exception("handler_failed")
                outcome = _INTERNAL
            if isinstance(outcome, Tunnel):
                await self._tunnel(outcome)
                return
            assert isinstance(outcome, Response)
            await self._send(outcome, request.method == "HEAD", request)
            if not keep or self.server._closing or _closes(outcome) or self._upgrade:
                self._close()
        except ConnectionError as exc:
            log.debug("connection_ended", extra={"error": str(exc)})
            self._close()
        finally:
            if counted:
                self.server._busy -= 1
            if self.tunnel is None:
                self.busy = False
                if not self.closed:
                    self._pump()

    async def _drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("the client closed the connection")
        if self._paused:
            if self._writable is None:
                self._writable = asyncio.get_running_loop().create_future()
            await self._writable

    async def _send(self, response: Response, head_only: bool, request: Request) -> None:
        transport = self.transport
        assert transport is not None
        body = response.body
        if isinstance(body, bytes):
            transport.write(encode_response(response, head_only))
            await self._drain()
            return
        headers = [
            (k, v)
            for k, v in response.headers
            if k.lower() not in ("content-length", "transfer-encoding")
        ]
        transport.write(_head(response.status, headers, b"transfer-encoding: chunked\r\n\r\n"))
        try:
            async for chunk in body:
                if chunk and not head_only:
                    # relay each chunk now: never buffer a stream
                    transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await self._drain()
                elif self.closed:
                    raise ConnectionResetError("the client closed the connection")
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
        transport.write(b"0\r\n\r\n")
        await self._drain()

    def _refuse(self, response: Response) -> None:
        self._out.append(encode_response(response))
        self._flush()
        self._close()

    def _close(self) -> None:
        self.queue.clear()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    # -- CONNECT -----------------------------------------------------------------------

    async def _tunnel(self, tunnel: Tunnel) -> None:
        loop = asyncio.get_running_loop()
        client = self.transport
        assert client is not None
        try:
            upstream, pipe = await asyncio.wait_for(
                loop.create_connection(lambda: _Pipe(self), tunnel.host, tunnel.port), 10
            )
        except (OSError, TimeoutError) as exc:
            message = f"cannot reach {tunnel.host}: {exc}\n".encode()
            await self._send(
                Response(502, [("content-type", "text/plain")], message), False, _NO_REQUEST
            )
            self._close()
            return
        if self.closed:
            upstream.close()
            return
        self.tunnel = upstream
        client.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        if self.leftover:
            upstream.write(self.leftover)
            self.leftover = b""
        if not self.reading:
            self.reading = True
            client.resume_reading()
        await pipe.done


_NO_REQUEST = Request("GET", "/", [], b"")


class _Pipe(asyncio.Protocol):
    """The origin side of a CONNECT tunnel: bytes to the client as they come."""

    def __init__(self, client: _Connection) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.resuming: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        client = self.client.transport
        if client is None or self.client.closed:
            return
        client.write(data)
        if client.get_write_buffer_size() > _HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self.resuming = asyncio.get_running_loop().create_task(self._resume_when_drained())

    async def _resume_when_drained(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.client._drain()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        client = self.client.transport
        if client is not None and not self.client.closed and client.can_write_eof():
            client.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._close()
        if not self.done.done():
            self.done.set_result(None)


def _closes(response: Response) -> bool:
    return any(k.lower() == "connection" and v.lower() == "close" for k, v in response.headers)


class HttpServer:
    def __init__(self, handler: Handler, max_body: int = MAX_BODY) -> None:
        self.handler = handler
        self.max_body = max_body
        self._server: asyncio.Server | None = None
        self._busy = 0
        self._connections: set[_Connection] = set()
        self._closing = False

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, backlog=512)
        sockets = self._server.sockets
        bound: int = sockets[0].getsockname()[1]
        return bound

    async def close(self, drain_seconds: float = 30.0, quiet: float = 0.5) -> None:
        """Drain, then close: wait (up to ``drain_seconds``) until no call has been in
        flight for ``quiet`` seconds — an MCP client often follows a call with another
        request (e.g. ``tools/list`` to check a result's schema), so requests keep being
        served meanwhile — then stop listening and close every connection. Listening
        streams (``GET`` on an MCP endpoint) are not calls and do not hold the drain."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_seconds
        quiet_since: float | None = None
        while loop.time() < deadline:
            if self._busy == 0:
                quiet_since = quiet_since if quiet_since is not None else loop.time()
                if loop.time() - quiet_since >= quiet:
                    break
            else:
                quiet_since = None
            await asyncio.sleep(0.05)
        self._closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection._close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)


def _is_listen_stream(request: Request) -> bool:
    """A client's open-ended SSE listening stream: a GET on an MCP endpoint (2025), or
    a 2026-07-28 ``subscriptions/listen`` POST (only the drain's accounting reads this)."""
    if not request.target.startswith("/mcp/"):
        return False
    if request.method == "GET":
        return True
    return request.method == "POST" and b'"subscriptions/listen"' in request.body[:4096]


def _bad_request(why: str) -> Response:
    return Response(
        400,
        [("content-type", "text/plain"), ("connection", "close")],
        f"bad request: {why}\n".encode(),
    )


def _too_large(limit: int) -> Response:
    body = (
        b'{"type":"https://agentmesh.dev/problems/request-body-too-large","title":'
        b'"Request body too large","status":413,"detail":"the sidecar accepts at most '
        + str(limit).encode()
        + b' bytes"}'
    )
    return Response(
        413, [("content-type", "application/problem+json"), ("connection", "close")], body
    )
