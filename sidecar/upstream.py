"""A lean, pooled HTTP/1.1 client for the upstream MCP servers.

The relay sits on every call's path, so its client matters: a general client
(httpx) spent about 1 ms of CPU per relayed call here, and even a pure-Python
HTTP state machine (h11) a few hundred µs on both sides of the relay. This one
is an ``asyncio.Protocol`` with llhttp (``httptools``) parsing the answer: a
request leaves in one ``write``, and a plain JSON answer that arrived whole is
handed over as bytes (``read_now``) without a task switch per chunk. One pool
per upstream; connections are reused, never opened per call; a streamed body
is relayed as it arrives and there is no read timeout (an SSE stream may be
quiet for long).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

from sidecar.errors import SidecarError

_CONNECT_TIMEOUT = 10.0
_HIGH_WATER = 256 * 1024  # bytes of an answer buffered before reading pauses


class UpstreamError(SidecarError):
    """The upstream could not be reached or broke the exchange."""


class StaleConnection(UpstreamError):
    """A reused connection failed before any byte of the answer: safe to retry (the
    pool retries it on a fresh connection; it never leaves the pool)."""


_Stale = StaleConnection


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.reused = False
        # Callback form (``UpstreamPool.send_now``): called from the protocol once the
        # answer's head arrived (its body too, when it came with it) or the exchange failed.
        self.on_head: Callable[[], None] | None = None
        self._reset(False)

    def _reset(self, head_only: bool) -> None:
        self.head_only = head_only
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.started = False  # a byte of the answer arrived
        self.error: Exception | None = None
        self.head: asyncio.Future[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionResetError(f"the upstream broke HTTP: {exc}"))
            if self.transport is not None:
                self.transport.close()
        if self.on_head is not None and self.status >= 200:
            self._call_on_head()

    def _call_on_head(self) -> None:
        callback, self.on_head = self.on_head, None
        if callback is not None:
            callback()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.complete:
            self._fail(ConnectionResetError("the upstream closed the connection"))

    # -- llhttp callbacks --------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1").strip()))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status < 200:  # an interim answer (1xx): the real one follows
            self.headers = []
            return
        self.keep_alive = self.parser.should_keep_alive()
        if self.head_only:  # an answer to HEAD has no body, whatever it declares
            self.complete = True
            self.keep_alive = False
        _wake(self.head)

    def on_body(self, body: bytes) -> None:
        if self.status < 200 or self.complete:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        _wake(self.waiter)

    def on_message_complete(self) -> None:
        if self.status < 200:
            return
        self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        self.complete = True
        _wake(self.waiter)

    # -- use -----------------------------------------------------------------------------

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        for future in (self.head, self.waiter):
            if future is not None and not future.done():
                future.set_exception(error)
        self._call_on_head()

    def take(self) -> bytes:
        chunks, self.chunks, self.buffered = self.chunks, [], 0
        if self.paused and self.transport is not None and not self.lost:
            self.paused = False
            self.transport.resume_reading()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def wait(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _wake(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


class UpstreamResponse:
    """An answer's status and headers; its body as bytes (``read_now`` / ``read``)
    or as an async iterator of chunks as they arrive (``body``)."""

    def __init__(
        self,
        status: int,
        headers: list[tuple[str, str]],
        connection: _Connection,
        pool: UpstreamPool,
    ) -> None:
        self.status = status
        self.headers = headers
        self._connection: _Connection | None = connection
        self._pool = pool

    def read_now(self) -> bytes | None:
        """The whole body when it has already arrived (the connection goes back to
        the pool), else None."""
        connection = self._connection
        if connection is None or not connection.complete:
            return None
        self._connection = None
        data = connection.take()
        self._pool._release(connection, True)
        return data

    async def read(self) -> bytes:
        now = self.read_now()
        if now is not None:
            return now
        return b"".join([chunk async for chunk in self.body])

    @property
    def body(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            return
        self._connection = None
        finished = False
        try:
            while True:
                if connection.chunks:
                    yield connection.take()
                    continue
                if connection.complete:
                    finished = True
                    return
                if connection.error is not None:
                    raise connection.error
                await connection.wait()
        finally:
            self._pool._release(connection, finished)


class UpstreamPool:
    def __init__(self, url: str, max_idle: int = 32) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream {url!r}: only http:// URLs are supported")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.authority = parts.netloc
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._start = f" {self.target} HTTP/1.1\r\nhost: {self.authority}\r\n"

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(_Connection, self.host, self.port), _CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {self.authority}: {exc}") from exc
        return connection

    async def request(
        self, method: str, headers: list[tuple[str, str]], body: bytes
    ) -> UpstreamResponse:
        """Send one request; retry once on a fresh connection if a reused one was
        already closed by the server (nothing of the answer was read then)."""
        data = self._encode(method, headers, body)
        while self._idle:
            connection = self._idle.pop()
            if connection.lost:
                continue
            try:
                return await self._exchange(connection, method, data)
            except _Stale:
                connection.close()
            except ConnectionError as exc:
                connection.close()
                raise UpstreamError(f"{self.authority} broke the exchange: {exc}") from exc
        connection = await self._connect()
        try:
            return await self._exchange(connection, method, data)
        except (ConnectionError, _Stale) as exc:
            connection.close()
            raise UpstreamError(f"{self.authority} broke the exchange: {exc}") from exc

    def send_now(
        self,
        method: str,
        headers: list[tuple[str, str]],
        body: bytes,
        on_head: Callable[[UpstreamResponse | None, Exception | None], None],
    ) -> bool:
        """``request`` in callback form, without a task: written at once on an idle
        connection (False, nothing sent, when none is idle). ``on_head`` is called from
        the protocol callback with the answer (its body may already be whole:
        ``read_now``), or with the error — ``StaleConnection`` when a reused connection
        failed before any byte of the answer (safe to send again elsewhere)."""
        while self._idle:
            connection = self._idle.pop()
            if connection.lost or connection.transport is None:
                continue
            connection._reset(method == "HEAD")

            def arrived(connection: _Connection = connection) -> None:
                if connection.status >= 200:
                    on_head(
                        UpstreamResponse(connection.status, connection.headers, connection, self),
                        None,
                    )
                    return
                error = connection.error or ConnectionResetError("no answer")
                stale = connection.reused and not connection.started
                connection.close()
                on_head(None, StaleConnection() if stale else error)

            connection.on_head = arrived
            connection.transport.write(self._encode(method, headers, body))
            return True
        return False

    def _encode(self, method: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
        lines = [method, self._start]
        for key, value in headers:
            if "\r" in value or "\n" in value or "\r" in key or "\n" in key:
                continue
            lines.append(f"{key}: {value}\r\n")
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"content-length: {len(body)}\r\n")
        lines.append("\r\n")
        # Head and body in one write: one segment on the wire for a small call.
        return "".join(lines).encode("latin-1", "replace") + body

    async def _exchange(
        self, connection: _Connection, method: str, data: bytes
    ) -> UpstreamResponse:
        connection._reset(method == "HEAD")
        connection.head = head = asyncio.get_running_loop().create_future()
        transport = connection.transport
        assert transport is not None
        transport.write(data)
        try:
            await head
        except ConnectionError:
            if connection.reused and not connection.started:
                raise _Stale from None
            raise
        finally:
            connection.head = None
        return UpstreamResponse(connection.status, connection.headers, connection, self)

    def _release(self, connection: _Connection, finished: bool) -> None:
        reusable = (
            finished
            and connection.complete
            and connection.keep_alive
            and not connection.lost
            and not connection.chunks
            and len(self._idle) < self.max_idle
        )
        if reusable:
            connection.reused = True
            self._idle.append(connection)
        else:
            connection.close()

    async def aclose(self) -> None:
        while self._idle:
            connection = self._idle.pop()
            connection.close()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)


async def read_all(body: AsyncIterator[bytes]) -> bytes:
    chunks = [chunk async for chunk in body]
    return b"".join(chunks)
