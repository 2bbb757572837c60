"""MCP over Streamable HTTP, relayed and gated — failing closed.

Both protocol generations in use pass through: 2025-06-18 / 2025-11-25
sessions (``initialize``, ``Mcp-Session-Id``, ``MCP-Protocol-Version``) and
the 2026-07-28 stateless form. The relay:

* **parses every POST body strictly, or refuses it** (``classify``): UTF-8
  without BOM, standard JSON (no ``NaN`` / ``Infinity``, no number that
  overflows to infinity, no duplicate key in any object), one JSON object
  (a batch is refused), a string ``method``, and for ``tools/call`` an object
  ``params`` with a string ``name``. Whatever the upstream would accept is
  either parsed here to the very same value (escapes such as ``tools\\u002fcall``
  decode as the upstream decodes them, because both use standard JSON) or
  refused with a JSON-RPC error before the upstream sees a byte. In
  permissive or shadow mode such a body is forwarded and recorded instead;
* checks the routing headers as the ``mcp`` SDK does (its own
  ``find_duplicated_routing_header``, ``decode_header_value`` and, for a
  2026-07-28 request, ``classify_inbound_request``): ``Mcp-Method`` /
  ``Mcp-Name`` (``=?base64?…?=`` decoded) that disagree with the body, or a
  routing header sent twice, are answered HTTP 400 with JSON-RPC -32020;
* gates ``tools/call`` on the policy: a blocked call never reaches the
  upstream and is answered HTTP 200 with a JSON-RPC error, code
  ``BLOCKED_CODE`` (-31403: outside JSON-RPC's reserved -32768…-32000 and the
  2026-07-28 reserved -32020…-32099), ``error.data`` saying why;
* filters ``tools/list`` answers (JSON or SSE) to the tools the agent may call;
* injects ``notifications/tools/list_changed`` into the open server streams
  (a 2025 session's ``GET`` stream; a 2026-07-28 ``subscriptions/listen``
  stream that asked for ``toolsListChanged``) when the visible tools change;
* relays SSE as it arrives (chunk by chunk, no read timeout on open streams,
  ``X-Accel-Buffering: no``), and every other message as-is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
from mcp.shared.inbound import (
    NAME_BEARING_METHODS,
    InboundLadderRejection,
    classify_inbound_request,
    decode_header_value,
    find_duplicated_routing_header,
)
from mcp.shared.subscriptions import SUBSCRIPTION_ID_META_KEY
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

from sidecar.errors import SidecarError
from sidecar.httpserver import Request, Response
from sidecar.upstream import StaleConnection, UpstreamError, UpstreamPool, UpstreamResponse

BLOCKED_CODE = -31403
HEADER_MISMATCH = -32020
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
LIST_CHANGED = "notifications/tools/list_changed"
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

# The JSON-RPC error payload of a refusal, or None when allowed / forwarded.
Verdict = dict[str, Any] | None
# Sync-first callbacks: the verdict now when it can be had without waiting, else an
# awaitable of it (a trust read, a commit, a handshake).
MaybeVerdict = Verdict | Awaitable[Verdict]
# (upstream, tool name) -> the decision's verdict
Gate = Callable[[str, str], MaybeVerdict]
ToolFilter = Callable[[str, list[str]], Awaitable[set[str]]]
# (why the body cannot be classified) -> the error payload when it is refused, None to forward
Unclassifiable = Callable[[str], MaybeVerdict]
BeforeCall = Callable[["Upstream"], MaybeVerdict]


def pending(verdict: MaybeVerdict) -> bool:
    """Whether a sync-first callback answered with an awaitable (not yet decided)."""
    return verdict is not None and not isinstance(verdict, dict)


async def settled(verdict: MaybeVerdict) -> Verdict:
    if verdict is None or isinstance(verdict, dict):
        return verdict
    return await verdict


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str
    did: str | None = None
    handshake_url: str | None = None


# -- strict parsing --------------------------------------------------------------------------


class Unparseable(SidecarError, ValueError):
    """The body is not one standard JSON-RPC message the sidecar can classify."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Classified:
    """What the sidecar understood of a POST body: the message, its method and,
    for ``tools/call``, the tool the upstream would run."""

    message: dict[str, Any]
    method: str | None
    tool: str | None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise Unparseable(PARSE_ERROR, f"duplicate key {duplicate!r} in a JSON object")
    return result


def _no_constant(name: str) -> Any:
    raise Unparseable(PARSE_ERROR, f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Unparseable(PARSE_ERROR, f"number {text[:40]} overflows")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise Unparseable(INVALID_REQUEST, f"{what} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Unparseable(INVALID_REQUEST, f"{what} holds a lone surrogate") from None
    return value


def classify(body: bytes) -> Classified:
    """Parse one JSON-RPC message strictly (see the module docstring); raise
    ``Unparseable`` for anything the sidecar cannot classify with certainty."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Unparseable(PARSE_ERROR, "the body is not UTF-8") from None
    if text.startswith("\ufeff"):
        raise Unparseable(PARSE_ERROR, "the body starts with a byte order mark")
    try:
        message = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_float=_finite,
        )
    except Unparseable:
        raise
    except (ValueError, RecursionError) as exc:
        raise Unparseable(PARSE_ERROR, f"invalid JSON: {exc}"[:200]) from None
    if isinstance(message, list):
        raise Unparseable(INVALID_REQUEST, "JSON-RPC batches are not accepted")
    if not isinstance(message, dict):
        raise Unparseable(INVALID_REQUEST, "a JSON-RPC message is a JSON object")
    if "method" not in message:
        return Classified(message, None, None)  # a response to the server, or not JSON-RPC
    method = _text(message["method"], "method")
    if method != "tools/call":
        return Classified(message, method, None)
    params = message.get("params")
    if not isinstance(params, dict):
        raise Unparseable(INVALID_PARAMS, "tools/call needs params as an object")
    if "name" not in params:
        raise Unparseable(INVALID_PARAMS, "tools/call needs params.name")
    return Classified(message, method, _text(params["name"], "params.name"))


def request_id(body: bytes) -> Any:
    """The id of a message the strict parser refused, when a lenient read finds one
    (only echoed in the error, never used to decide)."""
    with contextlib.suppress(msgspec.DecodeError, UnicodeDecodeError):
        message = _json.decode(body)
        if isinstance(message, dict) and isinstance(message.get("id"), str | int):
            return message["id"]
    return None


# -- routing headers -------------------------------------------------------------------------


def header_mismatch(request: Request, message: dict[str, Any]) -> str | None:
    """Why the routing headers disagree with the body (or each other), or None —
    checked as the SDK's server checks them."""
    duplicated = find_duplicated_routing_header(request.headers)
    if duplicated is not None:
        return f"{duplicated} header appears more than once"
    version = request.header("mcp-protocol-version")
    method = message.get("method")
    if version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS and "id" in message:
        # A 2026-07-28 request: the SDK's own ladder (its header rung decodes Mcp-Name).
        verdict = classify_inbound_request(message, headers=dict(request.headers))
        if isinstance(verdict, InboundLadderRejection) and verdict.code == HEADER_MISMATCH:
            return verdict.message
    header = request.header("mcp-method")
    if header is not None and decode_header_value(header) != method:
        return f"Mcp-Method header {header!r} does not match the body's method {method!r}"
    name_key = NAME_BEARING_METHODS.get(method) if isinstance(method, str) else None
    header = request.header("mcp-name")
    if header is not None and name_key is not None:
        params = message.get("params")
        body_name = params.get(name_key) if isinstance(params, dict) else None
        if decode_header_value(header) != body_name:
            return f"Mcp-Name header {header!r} does not match the body's {name_key} {body_name!r}"
    return None


# -- relaying --------------------------------------------------------------------------------


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


def _blocked(message: dict[str, Any], error: dict[str, Any]) -> Response:
    reason = error.pop("message")
    return json_response(200, rpc_error(message.get("id"), BLOCKED_CODE, reason, error))


@dataclass(eq=False)
class _Listener:
    """An open server stream a list_changed notification can be injected into."""

    upstream: str
    subscription_id: Any  # the listen request's id (2026-07-28), None for a 2025 GET stream
    queue: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)

    def event(self) -> bytes:
        note: dict[str, Any] = {"jsonrpc": "2.0", "method": LIST_CHANGED}
        if self.subscription_id is not None:
            note["params"] = {"_meta": {SUBSCRIPTION_ID_META_KEY: self.subscription_id}}
        return b"event: message\ndata: " + _encode.encode(note) + b"\n\n"


def _listens_for_tools(message: dict[str, Any]) -> bool:
    params = message.get("params")
    wanted = params.get("notifications") if isinstance(params, dict) else None
    return isinstance(wanted, dict) and wanted.get("toolsListChanged") is True


class McpRelay:
    """Relays one agent's MCP traffic to its upstream servers."""

    def __init__(
        self,
        pools: dict[str, UpstreamPool],
        upstreams: dict[str, Upstream],
        gate: Gate,
        allowed_tools: ToolFilter,
        before_call: BeforeCall,
        unclassifiable: Unclassifiable,
    ) -> None:
        self.pools = pools
        self.upstreams = upstreams
        self.gate = gate
        self.allowed_tools = allowed_tools
        self.before_call = before_call
        self.unclassifiable = unclassifiable
        self._listeners: set[_Listener] = set()
        self._tasks: set[asyncio.Future[Response]] = set()

    @property
    def listeners(self) -> int:
        """Open server streams that would get a list_changed notification."""
        return len(self._listeners)

    def tools_changed(self, upstream: str) -> int:
        """Send ``notifications/tools/list_changed`` on every open stream from
        ``upstream``; return how many."""
        sent = 0
        for listener in list(self._listeners):
            if listener.upstream == upstream:
                listener.queue.put_nowait(listener.event())
                sent += 1
        return sent

    def handle(self, name: str, request: Request) -> Response | Awaitable[Response]:
        """Sync-first: the answer now when no wait is needed (a refusal, a repeated
        denial), else an awaitable of it (a relayed call, a first denial's commit)."""
        upstream = self.upstreams.get(name)
        if upstream is None:
            return json_response(404, rpc_error(None, -32601, f"no upstream MCP server {name!r}"))
        if request.method != "POST":
            if request.body:
                return json_response(
                    400, rpc_error(None, INVALID_REQUEST, f"{request.method} carries no body")
                )
            return self._forward(upstream, request, None)
        try:
            classified = classify(request.body)
        except Unparseable as exc:
            refused = self.unclassifiable(exc.message)
            if pending(refused):
                return self._unclassified_later(upstream, request, exc, refused)
            return self._unclassified(upstream, request, exc, cast(Verdict, refused))
        message = classified.message
        mismatch = header_mismatch(request, message)
        if mismatch is not None:
            return json_response(400, rpc_error(message.get("id"), HEADER_MISMATCH, mismatch))
        if classified.tool is None:
            return self._forward(upstream, request, message)
        peer = self.before_call(upstream)
        if pending(peer):
            return self._gated_later(upstream, request, message, classified.tool, peer)
        error = peer if peer is not None else self.gate(upstream.name, classified.tool)
        if pending(error):
            return self._gated_later(upstream, request, message, classified.tool, None, error)
        if error is not None:
            return _blocked(message, cast(dict[str, Any], error))
        return self._forward(upstream, request, message)

    def _unclassified(
        self, upstream: Upstream, request: Request, exc: Unparseable, refused: Verdict
    ) -> Response | Awaitable[Response]:
        if refused is None:  # permissive / shadow: forwarded, and recorded
            return self._forward(upstream, request, None)
        return json_response(
            400, rpc_error(request_id(request.body), exc.code, exc.message, refused)
        )

    async def _unclassified_later(
        self, upstream: Upstream, request: Request, exc: Unparseable, refused: MaybeVerdict
    ) -> Response:
        outcome = self._unclassified(upstream, request, exc, await settled(refused))
        return outcome if isinstance(outcome, Response) else await outcome

    async def _gated_later(
        self,
        upstream: Upstream,
        request: Request,
        message: dict[str, Any],
        tool: str,
        peer: MaybeVerdict,
        error: MaybeVerdict = None,
    ) -> Response:
        found = await settled(peer)
        if found is None:
            found = await settled(error if error is not None else self.gate(upstream.name, tool))
        if found is not None:
            return _blocked(message, found)
        return await self._forward(upstream, request, message)

    def _forward(
        self, upstream: Upstream, request: Request, message: dict[str, Any] | None
    ) -> Awaitable[Response]:
        """Relay to the upstream. A POST on an idle pooled connection goes out at once and
        is answered from the connection's callback (an ``asyncio.Future``: no task, no
        coroutine chain to resume); anything else — a stream, a tools/list to filter, a
        new connection — goes on in a coroutine."""
        if request.method != "POST":
            return self._forward_later(upstream, request, message)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Response] = loop.create_future()

        def on_head(reply: UpstreamResponse | None, error: Exception | None) -> None:
            if answer.done():
                return
            if reply is None:
                if isinstance(error, StaleConnection):  # nothing read: send it again
                    self._chain(self._forward_later(upstream, request, message), answer)
                else:
                    answer.set_result(self._unreachable(upstream, message, error))
                return
            try:
                outcome = self._respond(upstream, request, message, reply)
            except Exception as exc:
                answer.set_exception(exc)
                return
            if isinstance(outcome, Response):
                answer.set_result(outcome)
            else:
                self._chain(outcome, answer)

        pool = self.pools[upstream.name]
        if not pool.send_now("POST", upstream_headers(request.headers), request.body, on_head):
            return self._forward_later(upstream, request, message)
        return answer

    def _chain(self, work: Awaitable[Response], answer: asyncio.Future[Response]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)  # held: the loop keeps only a weak reference

        def done(task: asyncio.Future[Response]) -> None:
            self._tasks.discard(task)
            if answer.done():
                return
            if task.cancelled():
                answer.cancel()
            elif task.exception() is not None:
                answer.set_exception(cast(BaseException, task.exception()))
            else:
                answer.set_result(task.result())

        task.add_done_callback(done)

    @staticmethod
    def _unreachable(
        upstream: Upstream, message: dict[str, Any] | None, error: Exception | None
    ) -> Response:
        request_id = None if message is None else message.get("id")
        return json_response(
            502, rpc_error(request_id, -32603, f"upstream {upstream.name} unreachable: {error}")
        )

    async def _forward_later(
        self, upstream: Upstream, request: Request, message: dict[str, Any] | None
    ) -> Response:
        pool = self.pools[upstream.name]
        body = request.body if request.method == "POST" else b""
        try:
            reply = await pool.request(request.method, upstream_headers(request.headers), body)
        except UpstreamError as exc:
            return self._unreachable(upstream, message, exc)
        outcome = self._respond(upstream, request, message, reply)
        return outcome if isinstance(outcome, Response) else await outcome

    def _respond(
        self,
        upstream: Upstream,
        request: Request,
        message: dict[str, Any] | None,
        reply: UpstreamResponse,
    ) -> Response | Awaitable[Response]:
        headers = forward_headers(reply.headers)
        content_type = next((v for k, v in reply.headers if k == "content-type"), "")
        method = None if message is None else message.get("method")
        lists_tools = method == "tools/list"
        if content_type.startswith("text/event-stream"):
            headers.append(("x-accel-buffering", "no"))
            listener: _Listener | None = None
            if request.method == "GET" and reply.status == 200:
                listener = _Listener(upstream.name, None)
            elif method == "subscriptions/listen" and message and _listens_for_tools(message):
                listener = _Listener(upstream.name, message.get("id"))
            request_id = None if message is None else message.get("id")
            stream = self._relay_sse(reply.body, upstream.name, request_id, lists_tools, listener)
            return Response(reply.status, headers, stream)
        payload = reply.read_now()  # a JSON answer usually arrived whole with its head
        if payload is None or (lists_tools and reply.status == 200):
            return self._json_later(upstream.name, reply, headers, payload, lists_tools)
        return Response(reply.status, headers, payload)

    async def _json_later(
        self,
        upstream: str,
        reply: UpstreamResponse,
        headers: list[tuple[str, str]],
        payload: bytes | None,
        lists_tools: bool,
    ) -> Response:
        if payload is None:
            payload = await reply.read()
        if lists_tools and reply.status == 200:
            payload = await self._filter_json(upstream, payload)
        return Response(reply.status, headers, payload)

    async def _filter_json(self, upstream: str, body: bytes) -> bytes:
        try:
            payload = _json.decode(body)
        except msgspec.DecodeError:
            return body
        return _encode.encode(await self._filter_message(upstream, payload))

    async def _filter_message(self, upstream: str, payload: Any) -> Any:
        result = payload.get("result") if isinstance(payload, dict) else None
        if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
            return payload
        tools = result["tools"]
        names = [t.get("name") for t in tools if isinstance(t, dict)]
        allowed = await self.allowed_tools(upstream, [n for n in names if isinstance(n, str)])
        result["tools"] = [t for t in tools if isinstance(t, dict) and t.get("name") in allowed]
        return payload

    async def _relay_sse(
        self,
        stream: AsyncIterator[bytes],
        upstream: str,
        request_id: Any,
        lists_tools: bool,
        listener: _Listener | None,
    ) -> AsyncIterator[bytes]:
        """Relay SSE event by event as it arrives: the tools/list answer rewritten,
        list_changed notifications injected between events."""
        if not lists_tools and listener is None:
            async for chunk in stream:
                yield chunk
            return
        if listener is not None:
            self._listeners.add(listener)
        chunks = stream.__aiter__()
        next_chunk: asyncio.Future[bytes] = asyncio.ensure_future(chunks.__anext__())
        next_note: asyncio.Future[bytes] | None = None
        buffer = b""
        try:
            while True:
                if listener is not None and next_note is None:
                    next_note = asyncio.ensure_future(listener.queue.get())
                waiting = {next_chunk} if next_note is None else {next_chunk, next_note}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if next_note is not None and next_note in done and not buffer:
                    yield next_note.result()  # between two events: never inside one
                    next_note = None
                if next_chunk not in done:
                    continue
                try:
                    chunk = next_chunk.result()
                except StopAsyncIteration:
                    break
                next_chunk = asyncio.ensure_future(chunks.__anext__())
                # SSE lines may end in CRLF; normalising to LF keeps every event's meaning.
                buffer = (buffer + chunk).replace(b"\r\n", b"\n")
                out = []
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    if lists_tools:
                        event = await self._filter_event(upstream, event, request_id)
                    out.append(event + b"\n\n")
                if out:
                    yield b"".join(out)
            if buffer:
                yield buffer
        finally:
            if listener is not None:
                self._listeners.discard(listener)
            for pending in (next_chunk, next_note):
                if pending is not None and not pending.done():
                    pending.cancel()
            with contextlib.suppress(Exception):
                await chunks.aclose()  # type: ignore[attr-defined]

    async def _filter_event(self, upstream: str, event: bytes, request_id: Any) -> bytes:
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
        filtered = _encode.encode(await self._filter_message(upstream, payload))
        others = [line for line in lines if not line.startswith(b"data:")]
        return b"\n".join([*others, b"data: " + filtered])
