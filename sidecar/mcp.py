"""MCP over Streamable HTTP, relayed and gated.

Both protocol generations in use pass through unchanged: 2025-06-18 /
2025-11-25 sessions (``initialize``, ``Mcp-Session-Id``,
``MCP-Protocol-Version``) and the 2026-07-28 stateless form, whose
``Mcp-Method`` / ``Mcp-Name`` headers mirror the body — a disagreement is
answered HTTP 400 with JSON-RPC error -32020, as the spec requires of anything
that parses both. The relay:

* gates ``tools/call`` on the policy: a blocked call never reaches the
  upstream and is answered HTTP 200 with a JSON-RPC error, code
  ``BLOCKED_CODE`` (-31403: outside JSON-RPC's reserved -32768…-32000 and the
  2026-07-28 reserved -32020…-32099), ``error.data`` saying why;
* filters ``tools/list`` answers (JSON or SSE) to the tools the agent may call;
* relays SSE as it arrives (chunk by chunk, no read timeout on open streams,
  ``X-Accel-Buffering: no``), and every other message as-is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from sidecar.httpserver import Request, Response
from sidecar.upstream import UpstreamError, UpstreamPool, read_all

BLOCKED_CODE = -31403
HEADER_MISMATCH = -32020
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
_json = msgspec.json.Decoder()
_encode = msgspec.json.Encoder()

# (tool name) -> the decision's JSON-RPC error payload, or None when allowed.
Gate = Callable[[str], Awaitable[dict[str, Any] | None]]
ToolFilter = Callable[[list[str]], Awaitable[set[str]]]


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str
    did: str | None = None
    handshake_url: str | None = None


def forward_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k not in _HOP_BY_HOP]


def upstream_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """What goes upstream: end-to-end headers, and identity encoding so the bytes
    relayed (and filtered) are the bytes the headers describe."""
    kept = [(k, v) for k, v in forward_headers(headers) if k != "accept-encoding"]
    return [*kept, ("accept-encoding", "identity")]


def rpc_error(
    request_id: Any, code: int, message: str, data: dict[str, Any] | None = None
) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return _encode.encode({"jsonrpc": "2.0", "id": request_id, "error": error})


def json_response(status: int, body: bytes) -> Response:
    return Response(status, [("content-type", "application/json")], body)


def header_mismatch(request: Request, message: dict[str, Any]) -> str | None:
    """Why the 2026-07-28 routing headers disagree with the body, or None."""
    method = request.header("mcp-method")
    if method is not None and method != message.get("method"):
        return f"Mcp-Method header {method!r} does not match body method {message.get('method')!r}"
    name = request.header("mcp-name")
    if name is not None:
        params = message.get("params") or {}
        body_name = (
            params.get("uri") if message.get("method") == "resources/read" else params.get("name")
        )
        if name != body_name:
            return f"Mcp-Name header {name!r} does not match the body's {body_name!r}"
    return None


class McpRelay:
    """Relays one agent's MCP traffic to its upstream servers."""

    def __init__(
        self,
        pools: dict[str, UpstreamPool],
        upstreams: dict[str, Upstream],
        gate: Gate,
        allowed_tools: ToolFilter,
        before_call: Callable[[Upstream], Awaitable[dict[str, Any] | None]],
    ) -> None:
        self.pools = pools
        self.upstreams = upstreams
        self.gate = gate
        self.allowed_tools = allowed_tools
        self.before_call = before_call

    async def handle(self, name: str, request: Request) -> Response:
        upstream = self.upstreams.get(name)
        if upstream is None:
            return json_response(404, rpc_error(None, -32601, f"no upstream MCP server {name!r}"))
        message = self._message(request)
        if isinstance(message, dict):
            mismatch = header_mismatch(request, message)
            if mismatch is not None:
                return json_response(400, rpc_error(message.get("id"), HEADER_MISMATCH, mismatch))
            blocked = await self._gate(upstream, message)
            if blocked is not None:
                return json_response(200, blocked)
        elif isinstance(message, list) and message:
            for item in message:  # a (pre-2025-06-18) batch: one blocked call blocks the batch
                blocked = await self._gate(upstream, item) if isinstance(item, dict) else None
                if blocked is not None:
                    return json_response(200, blocked)
        return await self._forward(upstream, request, message)

    @staticmethod
    def _message(request: Request) -> Any:
        if request.method != "POST" or not request.body:
            return None
        try:
            return _json.decode(request.body)
        except msgspec.DecodeError:
            return None  # the upstream answers malformed JSON itself

    async def _gate(self, upstream: Upstream, message: dict[str, Any]) -> bytes | None:
        if message.get("method") != "tools/call":
            return None
        params = message.get("params") or {}
        tool = params.get("name")
        if not isinstance(tool, str):
            return None
        peer = await self.before_call(upstream)
        error = peer if peer is not None else await self.gate(tool)
        if error is None:
            return None
        return rpc_error(message.get("id"), BLOCKED_CODE, error.pop("message"), error)

    async def _forward(self, upstream: Upstream, request: Request, message: Any) -> Response:
        pool = self.pools[upstream.name]
        body = request.body if request.method not in ("GET", "HEAD", "DELETE") else b""
        try:
            reply = await pool.request(request.method, upstream_headers(request.headers), body)
        except UpstreamError as exc:
            request_id = message.get("id") if isinstance(message, dict) else None
            return json_response(
                502, rpc_error(request_id, -32603, f"upstream {upstream.name} unreachable: {exc}")
            )
        headers = forward_headers(reply.headers)
        content_type = next((v for k, v in reply.headers if k == "content-type"), "")
        lists_tools = isinstance(message, dict) and message.get("method") == "tools/list"
        if content_type.startswith("text/event-stream"):
            headers.append(("x-accel-buffering", "no"))
            stream = reply.body
            if lists_tools:
                stream = self._filter_sse(stream, message.get("id"))
            return Response(reply.status, headers, stream)
        payload = await read_all(reply.body)
        if lists_tools and reply.status == 200:
            payload = await self._filter_json(payload)
        return Response(reply.status, headers, payload)

    async def _filter_json(self, body: bytes) -> bytes:
        try:
            payload = _json.decode(body)
        except msgspec.DecodeError:
            return body
        return _encode.encode(await self._filter_message(payload))

    async def _filter_message(self, payload: Any) -> Any:
        result = payload.get("result") if isinstance(payload, dict) else None
        if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
            return payload
        tools = result["tools"]
        names = [t.get("name") for t in tools if isinstance(t, dict)]
        allowed = await self.allowed_tools([n for n in names if isinstance(n, str)])
        result["tools"] = [t for t in tools if isinstance(t, dict) and t.get("name") in allowed]
        return payload

    async def _filter_sse(
        self, stream: AsyncIterator[bytes], request_id: Any
    ) -> AsyncIterator[bytes]:
        """Rewrite the SSE event carrying the tools/list answer; relay the rest as is."""
        buffer = b""
        async for chunk in stream:
            # SSE lines may end in CRLF; normalising to LF keeps every event's meaning.
            buffer += chunk.replace(b"\r\n", b"\n")
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                yield await self._filter_event(event, request_id) + b"\n\n"
        if buffer:
            yield buffer

    async def _filter_event(self, event: bytes, request_id: Any) -> bytes:
        lines = event.split(b"\n")
        data = [line[5:].lstrip() for line in lines if line.startswith(b"data:")]
        if not data:
            return event
        try:
            payload = _json.decode(b"\n".join(data))
        except msgspec.DecodeError:
            return event
        if not isinstance(payload, dict) or payload.get("id") != request_id:
            return event
        filtered = _encode.encode(await self._filter_message(payload))
        others = [line for line in lines if not line.startswith(b"data:")]
        return b"\n".join([*others, b"data: " + filtered])
