"""The hottest read and the commonest write answered below the route machinery.

``GET /v1/agents/{did}/trust`` (no query) is what sidecars and dashboards poll.
Through the routed handler, Litestar's per-request work — the request object,
the signature model and dependency injection, the response object and its
headers — cost more than the read itself. ``TrustReadLane`` is a middleware on
every route that answers this one after routing (so the route template,
``TelemetryMiddleware``'s timing and span, and the exception handler all still
apply) with the same document the handler answers: the same read
(``store.agent_docs``), the same view (``projections.documents.TrustOnly``), the same wire struct
(``schemas.trust_out``) encoded by msgspec, the same headers.

Anything else falls through to the handler unchanged: another route or method,
any query string (``?at=``), a malformed DID (the handler's 400), an unknown
agent (its 404), a read store that fails (its 503). The handler stays the one
the OpenAPI document describes.

``SignedReportLane`` does the same for one signed report per ``POST
/v1/violations`` or ``POST /v1/signals`` (what sidecars send): the body is read
once and decoded by msgspec straight into ``SignedEventIn`` (not into a dict
that the signature model walks and ``_convert`` walks again), then the same
``_signed`` check and the same ``ledger.append`` as the handler, answered 201
with the same ``Appended``. A ledger refusal is answered with the handler's
problem document (``api.errors.ledger_problem``). What it does not take goes to
the handler with the body replayed: a content type other than
``application/json``, a body that is not a signed report (an admin call, bad
JSON, a wrong field: the handler's 400), an event of another type, a body
over the size limit (the handler's 413), anything failing before the append.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from litestar.types import ASGIApp, Receive, Scope, Send

from api import schemas as s
from api.context import MAX_BODY_BYTES, ApiContext
from api.errors import MEDIA_TYPE, ledger_problem
from api.routes import _signed  # the handler's own check
from ledger.errors import LedgerError
from ledger.events import PolicyViolation, TrustSignal
from ledger.identity import is_did
from ledger.timefmt import format_time
from projections.documents import decode_trust_only
from projections.readstore import ReadStoreError

TRUST_TEMPLATE = "/v1/agents/{did}/trust"
_encoder = msgspec.json.Encoder()
_JSON = (b"content-type", b"application/json")


class TrustReadLane:
    def __init__(self, app: ASGIApp, context: Callable[[], ApiContext]) -> None:
        self.app = app
        self.context = context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope.get("path_template") == TRUST_TEMPLATE
            and scope.get("method") == "GET"
            and not scope.get("query_string")
        ):
            body = await self.answer(str(scope["path_params"]["did"]))
            if body is not None:
                headers = [_JSON, (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
        await self.app(scope, receive, send)

    async def answer(self, did: str) -> bytes | None:
        """The handler's 200 body, or None for anything the handler should answer."""
        if not is_did(did):
            return None
        ctx = self.context()
        now = ctx.now()
        try:
            (raw,) = await ctx.reader.store.agent_docs([did])
        except ReadStoreError:
            return None
        if raw is None:
            return None
        view = decode_trust_only(raw).view(ctx.reader.config, now)
        return _encoder.encode(s.trust_out(view, format_time(now)))


REPORT_TEMPLATES: dict[str, type[PolicyViolation] | type[TrustSignal]] = {
    "/v1/violations": PolicyViolation,
    "/v1/signals": TrustSignal,
}
_report_decoder = msgspec.json.Decoder(s.SignedEventIn)


class SignedReportLane:
    def __init__(self, app: ASGIApp, context: Callable[[], ApiContext]) -> None:
        self.app = app
        self.context = context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = REPORT_TEMPLATES.get(str(scope.get("path_template")))
        if kind is None or scope.get("method") != "POST" or not _json_within_limit(scope):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more and size <= MAX_BODY_BYTES:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: the handler sees it
                await self.app(scope, _replay(chunks, receive, more=False, last=message), send)
                return
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = bool(message.get("more_body", False))
        if more:  # over the limit: the handler reads the rest and answers 413
            await self.app(scope, _replay(chunks, receive, more=True), send)
            return
        raw = b"".join(chunks)
        signed = _parse_signed(raw, kind)
        if signed is None:
            await self.app(scope, _replay(chunks, receive, more=False), send)
            return
        report, event = signed
        try:
            result = await self.context().ledger.append(
                [event], idempotency_key=report.idempotency_key
            )
        except LedgerError as exc:
            status, document = ledger_problem(exc, str(scope["path"]))
            await _answer(send, status, _encoder.encode(document), MEDIA_TYPE.encode())
            return
        appended = s.Appended(
            position=result.positions[-1],
            stream_id=result.stream_id,
            stream_version=result.stream_version,
            duplicate=result.duplicate,
        )
        await _answer(send, 201, _encoder.encode(appended), _JSON[1])


def _json_within_limit(scope: Scope) -> bool:
    """``Content-Type: application/json`` and no declared length over the limit."""
    content_type = length = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value
        elif name == b"content-length":
            length = value
    if content_type != b"application/json":
        return False
    return length is None or (length.isdigit() and int(length) <= MAX_BODY_BYTES)


def _parse_signed(raw: bytes, kind: type[PolicyViolation] | type[TrustSignal]) -> Any:
    """(``SignedEventIn``, ``SignedEvent``) of a signed report of ``kind``; None for
    anything else, which the handler answers (with the same checks, so the same
    problem)."""
    try:
        report = _report_decoder.decode(raw)
        return report, _signed(report, kind)
    except Exception:
        return None


def _replay(chunks: list[bytes], receive: Receive, *, more: bool, last: Any = None) -> Any:
    """A receive that gives back what was read (as one message; ``more``: the rest
    is still to come from ``receive``), then ``last`` if given, then ``receive``."""
    pending: list[Any] = [{"type": "http.request", "body": b"".join(chunks), "more_body": more}]
    if last is not None:
        pending.append(last)

    async def replayed() -> Any:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


async def _answer(send: Send, status: int, body: bytes, media_type: bytes) -> None:
    headers = [(b"content-type", media_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
