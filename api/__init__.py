"""The trust API: a Litestar application over the ledger's ports and the read
stores (``agentmesh serve api``).

Modules::

    app         ``create_app``: the application, its routes, OpenAPI and Swagger UI
    context     ``ApiContext``: the clients every handler gets, built once in the lifespan
    routes      thin handlers: parse, authorize, call the ledger or the reader, shape
    handshakes  challenge/response handshakes: ``Challenge`` and the ``HandshakeStore`` port
    handshakes_postgres  ``PostgresHandshakeStore``: challenges shared by replicas (adapter)
    handshakes_memory    ``MemoryHandshakeStore``: one process, for unit tests (adapter)
    schemas     wire types (msgspec structs; the OpenAPI document is built from them)
    errors      RFC 9457 problem details for every error the API returns
    openapi     the OpenAPI document, corrected where Litestar cannot know the truth
    metrics     Prometheus metrics, served on their own port
    telemetry   request metrics and traces, one ASGI middleware

Exceptions::

    ProblemError   (errors) answered as an RFC 9457 problem (status, slug, title, detail)

Errors of the ledger (``ledger.errors``) and of the projections are mapped to
problems in ``api.errors``; the API defines no other exception.

The names in ``__all__`` are loaded on first use, so importing ``api.schemas``
does not import Litestar's application.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api.app import create_app
    from api.context import ApiContext
    from api.errors import ProblemError

_EXPORTS = {
    "ApiContext": "api.context",
    "ProblemError": "api.errors",
    "create_app": "api.app",
}

__all__ = ["ApiContext", "ProblemError", "create_app"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'api' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
