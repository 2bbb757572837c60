"""Plain HTTP egress: the sidecar as the agent's HTTP proxy.

Absolute-form requests (``GET http://host/path``) are forwarded when the
destination is allowed; ``CONNECT host:port`` opens a tunnel (HTTPS) when it
is. A denial is HTTP 403 with a problem-details body — to the agent's HTTP
client that is an ordinary refusal, not a broken transport.

Decided by address, not by spelling: an IP literal in any spelling a C
resolver accepts is canonicalised (``sidecar.policy.ip_literal``); a name is
resolved **once**, the policy decides on the name and that address, and the
connection goes to that very address (the request keeps its ``Host``), so a
DNS answer that changes between the check and the connect (rebinding) cannot
take the agent anywhere the policy did not see.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec

from sidecar.httpserver import Request, Response, Tunnel
from sidecar.mcp import forward_headers, upstream_headers
from sidecar.policy import Address, ip_literal, normalize_host

# (host name as the agent wrote it, the address the connection would use or None)
HostGate = Callable[[str, Address | None], Awaitable[dict[str, Any] | None]]
Resolver = Callable[[str, int], Awaitable[Address | None]]


def is_proxy_request(request: Request) -> bool:
    return request.method == "CONNECT" or request.target.startswith(("http://", "https://"))


def denied(target: str, error: dict[str, Any]) -> Response:
    body = {
        "type": "https://agentmesh.dev/problems/egress-denied",
        "title": "Egress denied",
        "status": 403,
        "detail": f"{target}: {error.get('message', 'blocked')}",
        "instance": target,
        **{k: v for k, v in error.items() if k != "message"},
    }
    return Response(403, [("content-type", "application/problem+json")], msgspec.json.encode(body))


def _text(status: int, message: str) -> Response:
    return Response(status, [("content-type", "text/plain")], f"{message}\n".encode())


async def resolve(host: str, port: int) -> Address | None:
    """The first address ``getaddrinfo`` gives for ``host`` (None when it does not resolve)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ip_literal(str(sockaddr[0]))
        if address is not None:
            return address
    return None


async def _destination(
    host: str, port: int, gate: HostGate, resolver: Resolver
) -> tuple[Address | None, dict[str, Any] | None]:
    """The checked address for ``host`` and the gate's verdict on it."""
    name = normalize_host(host)
    address = ip_literal(name)
    if address is None:
        address = await resolver(name, port)
    shown = str(address) if address is not None and ip_literal(name) is not None else name
    return address, await gate(shown, address)


async def egress(
    request: Request,
    gate: HostGate,
    client: httpx.AsyncClient,
    resolver: Resolver = resolve,
) -> Response | Tunnel:
    if request.method == "CONNECT":
        host, _, port = request.target.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            return _text(400, "CONNECT host:port")
        address, error = await _destination(host, int(port), gate, resolver)
        if error is not None:
            return denied(request.target, error)
        if address is None:
            return _text(502, f"cannot resolve {host}")
        return Tunnel(str(address), int(port))
    parts = urlsplit(request.target)
    if parts.scheme != "http" or not parts.hostname:
        return _text(400, "absolute-form http:// only; use CONNECT for https")
    try:
        http_port = parts.port or 80
    except ValueError:
        return _text(400, "invalid port")
    address, error = await _destination(parts.hostname, http_port, gate, resolver)
    if error is not None:
        return denied(request.target, error)
    if address is None:
        return _text(502, f"cannot resolve {parts.hostname}")
    # Connect to the checked address; the origin still sees the Host the agent asked for.
    literal = f"[{address}]" if address.version == 6 else str(address)
    pinned = urlunsplit(("http", f"{literal}:{http_port}", parts.path, parts.query, ""))
    headers = [(k, v) for k, v in upstream_headers(request.headers)]
    headers.append(("host", parts.netloc.rpartition("@")[2]))
    outgoing = client.build_request(
        request.method, pinned, headers=headers, content=request.body or None
    )
    try:
        reply = await client.send(outgoing, stream=True)
    except httpx.HTTPError as exc:
        return _text(502, str(exc))

    async def body() -> Any:
        try:
            async for chunk in reply.aiter_raw():
                yield chunk
        finally:
            await reply.aclose()

    return Response(reply.status_code, forward_headers(list(reply.headers.multi_items())), body())
