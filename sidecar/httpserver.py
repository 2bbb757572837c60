"""A small HTTP/1.1 server on h11, built for a forward proxy.

ASGI servers cannot tunnel ``CONNECT`` and buffer in places a proxy must
not, so the sidecar speaks HTTP itself: keep-alive, streamed response bodies
(each chunk written as it comes — no buffering, no read timeout on an open
stream), ``CONNECT`` tunnels, absolute-form targets, a body limit (413), and
a graceful drain: ``close()`` stops accepting, lets in-flight requests
finish, then closes idle connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import h11

log = logging.getLogger("agentmesh.sidecar.http")

MAX_BODY = 4 * 1024 * 1024
_READ_SIZE = 65536


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


Handler = Callable[[Request], Awaitable[Response | Tunnel]]


class HttpServer:
    def __init__(self, handler: Handler, max_body: int = MAX_BODY) -> None:
        self.handler = handler
        self.max_body = max_body
        self._server: asyncio.Server | None = None
        self._busy = 0
        self._connections: set[asyncio.StreamWriter] = set()
        self._closing = False

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._connection, host, port, backlog=512)
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
        for writer in list(self._connections):
            writer.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    # -- one connection ------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            while not self._closing:
                request = await self._read_request(conn, reader, writer)
                if request is None:
                    return
                counted = not _is_listen_stream(request)
                if counted:
                    self._enter()
                try:
                    keep = await self._serve(conn, request, reader, writer)
                finally:
                    if counted:
                        self._leave()
                if not keep or conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError) as exc:
            log.debug("connection_ended", extra={"error": str(exc)})
        finally:
            self._connections.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _enter(self) -> None:
        self._busy += 1

    def _leave(self) -> None:
        self._busy -= 1

    async def _next_event(self, conn: h11.Connection, reader: asyncio.StreamReader) -> object:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await reader.read(_READ_SIZE)
            conn.receive_data(data)

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Request | None:
        try:
            event = await self._next_event(conn, reader)
        except h11.RemoteProtocolError as exc:
            await self._send(
                conn,
                writer,
                Response(exc.error_status_hint, [("content-type", "text/plain")], b"bad request\n"),
            )
            return None
        if not isinstance(event, h11.Request):
            return None
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers]
        method = event.method.decode("ascii")
        body = bytearray()
        if method != "CONNECT":
            while True:
                part = await self._next_event(conn, reader)
                if isinstance(part, h11.Data):
                    body += part.data
                    if len(body) > self.max_body:
                        await self._send(conn, writer, _too_large(self.max_body))
                        return None
                elif isinstance(part, h11.EndOfMessage):
                    break
                else:
                    return None
        return Request(method, event.target.decode("latin-1"), headers, bytes(body))

    async def _serve(
        self,
        conn: h11.Connection,
        request: Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        try:
            outcome = await self.handler(request)
        except Exception:
            log.exception("handler_failed")
            outcome = Response(
                502,
                [("content-type", "application/problem+json")],
                b'{"type":"https://agentmesh.dev/problems/internal","title":'
                b'"Sidecar error","status":502,"detail":"see the sidecar logs"}',
            )
        if isinstance(outcome, Tunnel):
            await self._tunnel(conn, outcome, reader, writer)
            return False
        await self._send(conn, writer, outcome)
        return True

    async def _send(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, response: Response
    ) -> None:
        headers = [(k, v) for k, v in response.headers if k.lower() != "content-length"]
        if isinstance(response.body, bytes):
            headers.append(("content-length", str(len(response.body))))
        head = conn.send(h11.Response(status_code=response.status, headers=headers))
        if isinstance(response.body, bytes):
            # Head, body and end in one write: one segment on the wire for a small answer.
            data = head + (conn.send(h11.Data(data=response.body)) if response.body else b"")
            writer.write(data + conn.send(h11.EndOfMessage()))
            await writer.drain()
            return
        writer.write(head)
        try:
            async for chunk in response.body:
                if chunk:
                    writer.write(conn.send(h11.Data(data=chunk)))
                    await writer.drain()  # relay each chunk now: never buffer a stream
        finally:
            aclose = getattr(response.body, "aclose", None)
            if aclose is not None:
                await aclose()
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    async def _tunnel(
        self,
        conn: h11.Connection,
        tunnel: Tunnel,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(tunnel.host, tunnel.port), 10
            )
        except (OSError, TimeoutError) as exc:
            message = f"cannot reach {tunnel.host}: {exc}\n".encode()
            await self._send(conn, writer, Response(502, [("content-type", "text/plain")], message))
            return
        writer.write(
            conn.send(h11.Response(status_code=200, headers=[], reason=b"Connection Established"))
        )
        await writer.drain()
        leftover, _ = conn.trailing_data
        if leftover:
            up_writer.write(leftover)
        await asyncio.gather(
            _pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True
        )
        up_writer.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(_READ_SIZE):
            sink.write(data)
            await sink.drain()
    finally:
        with contextlib.suppress(Exception):
            sink.write_eof()


def _is_listen_stream(request: Request) -> bool:
    """A client's open-ended SSE listening stream: a GET on an MCP endpoint (2025), or
    a 2026-07-28 ``subscriptions/listen`` POST (only the drain's accounting reads this)."""
    if not request.target.startswith("/mcp/"):
        return False
    if request.method == "GET":
        return True
    return request.method == "POST" and b'"subscriptions/listen"' in request.body[:4096]


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
