"""The hottest read answered below the route machinery.

``GET /v1/agents/{did}/trust`` (no query) is what sidecars and dashboards poll.
Through the routed handler, Litestar's per-request work — the request object,
the signature model and dependency injection, the response object and its
headers — cost more than the read itself. ``TrustReadLane`` is a middleware on
every route that answers this one after routing (so the route template,
``TelemetryMiddleware``'s timing and span, and the exception handler all still
apply) with the same document the handler answers: the same read
(``store.agent_docs``), the same view (``api.trustread``), the same wire struct
(``schemas.trust_out``) encoded by msgspec, the same headers.

Anything else falls through to the handler unchanged: another route or method,
any query string (``?at=``), a malformed DID (the handler's 400), an unknown
agent (its 404), a read store that fails (its 503). The handler stays the one
the OpenAPI document describes.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from litestar.types import ASGIApp, Receive, Scope, Send

from api import schemas as s
from api.context import ApiContext
from api.trustread import decode_trust
from ledger.identity import is_did
from ledger.timefmt import format_time
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
        view = decode_trust(raw).view(ctx.reader.config, now)
        return _encoder.encode(s.trust_out(view, format_time(now)))
