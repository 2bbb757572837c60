"""uvicorn's HTTP/1.1 protocols with TCP_NODELAY on every accepted connection.

With ``workers > 1`` uvicorn binds the listening socket itself with
``proto=0``, so asyncio never sets TCP_NODELAY on accepted sockets; Nagle's
algorithm then meets delayed ACKs and every keep-alive response after the
first waits ~40 ms (uvicorn issue #3149). Setting it here fixes both paths.

``http_protocol()`` is the class ``serve api --workers N`` hands uvicorn: its
httptools protocol (the C parser a single worker gets by default) when httptools
is installed, else h11's (pure Python) — several workers must not parse HTTP
slower than one. Both are module-level classes: uvicorn's worker processes are
spawned, and receive the class by reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional for uvicorn
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


def _no_delay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class NoDelayH11Protocol(H11Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _no_delay(transport)
        super().connection_made(transport)  # type: ignore[arg-type]


if HttpToolsProtocol is not None:

    class NoDelayHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            _no_delay(transport)
            super().connection_made(transport)  # type: ignore[arg-type]


def http_protocol() -> type[asyncio.Protocol]:
    """httptools' protocol with TCP_NODELAY when httptools is installed, else h11's."""
    if HttpToolsProtocol is None:
        return NoDelayH11Protocol
    return NoDelayHttpToolsProtocol
