"""A TCP relay in front of a real server, whose open connections can be made to go
silent: what a client sees of a server whose pod was rescheduled elsewhere (its old
address answers nothing, and no reset ever comes)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    silent: bool = False


@dataclass
class Relay:
    """Relays loopback connections on ``port`` to ``target_port``. ``silence()``: the
    connections open so far stay open, but what either side sends is read and
    dropped; connections opened later are relayed as before (the server's new
    address)."""

    target_port: int
    host: str = "127.0.0.1"
    port: int = 0
    _server: asyncio.Server | None = None
    _links: list[_Link] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def silence(self) -> int:
        """Make every connection open now go silent; how many there are."""
        for link in self._links:
            link.silent = True
        return len(self._links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.close()
            return
        link = _Link(writer, up_writer)
        self._links.append(link)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(_pump(source, sink, link))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for link in self._links:
            link.client.close()
            link.server.close()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, link: _Link) -> None:
    with contextlib.suppress(OSError):
        while data := await source.read(65536):
            if not link.silent:
                sink.write(data)
                await sink.drain()
    if not link.silent:  # an end is passed on only while the link still speaks
        sink.close()
