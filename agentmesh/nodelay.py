"""uvicorn's HTTP/1.1 protocol with TCP_NODELAY on every accepted connection.

With ``workers > 1`` uvicorn binds the listening socket itself with
``proto=0``, so asyncio never sets TCP_NODELAY on accepted sockets; Nagle's
algorithm then meets delayed ACKs and every keep-alive response after the
first waits ~40 ms (uvicorn issue #3149). Setting it here fixes both paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol


class NoDelayH11Protocol(H11Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)  # type: ignore[arg-type]
