"""Plain HTTP egress: the sidecar as the agent's HTTP proxy.

Absolute-form requests (``GET http://host/path``) are forwarded when the
destination host is allowed; ``CONNECT host:port`` opens a tunnel (HTTPS)
when it is. A denial is HTTP 403 with a problem-details body — to the agent's
HTTP client that is an ordinary refusal, not a broken transport.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec

from sidecar.httpserver import Request, Response, Tunnel
from sidecar.mcp import forward_headers, upstream_headers

HostGate = Callable[[str], Awaitable[dict[str, Any] | None]]


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


async def egress(request: Request, gate: HostGate, client: httpx.AsyncClient) -> Response | Tunnel:
    if request.method == "CONNECT":
        host, _, port = request.target.rpartition(":")
        if not host or not port.isdigit():
            return Response(400, [("content-type", "text/plain")], b"CONNECT host:port\n")
        error = await gate(host.strip("[]").lower())
        return denied(request.target, error) if error is not None else Tunnel(host, int(port))
    parts = urlsplit(request.target)
    if parts.scheme != "http" or not parts.hostname:
        return Response(
            400,
            [("content-type", "text/plain")],
            b"absolute-form http:// only; use CONNECT for https\n",
        )
    error = await gate(parts.hostname.lower())
    if error is not None:
        return denied(request.target, error)
    outgoing = client.build_request(
        request.method,
        request.target,
        headers=upstream_headers(request.headers),
        content=request.body or None,
    )
    try:
        reply = await client.send(outgoing, stream=True)
    except httpx.HTTPError as exc:
        return Response(502, [("content-type", "text/plain")], f"{exc}\n".encode())

    async def body() -> Any:
        try:
            async for chunk in reply.aiter_raw():
                yield chunk
        finally:
            await reply.aclose()

    return Response(reply.status_code, forward_headers(list(reply.headers.multi_items())), body())
