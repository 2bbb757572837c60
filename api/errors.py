"""RFC 9457 problem details for every error the API returns.

Domain errors are translated once, here: a client sees a status, a stable
``type``, a ``title`` and a ``detail`` — never a stack trace. Unexpected
errors are logged and answered with a generic 500 problem.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from ledger.errors import (
    AppendRejectedError,
    ConcurrencyError,
    EventValidationError,
    IdempotencyConflictError,
    LedgerError,
    NotPermittedError,
    ProofError,
    ReplayError,
    SignatureError,
    StoreUnavailableError,
    VerificationError,
)
from projections.errors import DelegationError, ProjectionError
from projections.readstore import ReadStoreError

log = logging.getLogger("agentmesh.api")

PROBLEM_TYPE_BASE = "https://agentmesh.dev/problems/"
MEDIA_TYPE = "application/problem+json"


class ProblemError(Exception):
    """An error that is answered as a problem document."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.headers = headers
        self.extra = extra


def problem(
    status: int,
    slug: str,
    title: str,
    detail: str,
    instance: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response[dict[str, Any]]:
    body = {
        "type": PROBLEM_TYPE_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
        **extra,
    }
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return Response(body, status_code=status, media_type=MEDIA_TYPE, headers=headers or None)


def ledger_problem(exc: LedgerError, instance: str) -> tuple[int, dict[str, Any]]:
    """The status and problem document ``handle`` answers for a ledger error."""
    status, slug, title = _ledger(exc)
    body = {
        "type": PROBLEM_TYPE_BASE + slug,
        "title": title,
        "status": status,
        "detail": str(exc),
        "instance": instance,
    }
    return status, body


def _ledger(exc: LedgerError) -> tuple[int, str, str]:
    match exc:
        case SignatureError():
            return 422, "bad-signature", "Signature rejected"
        case ConcurrencyError():
            return 409, "version-conflict", "Stream version conflict"
        case IdempotencyConflictError():
            return 409, "idempotency-conflict", "Idempotency key reused"
        case ReplayError():
            return 409, "replayed", "Event already recorded"
        case ProofError():
            return 400, "invalid-proof-request", "No such proof"
        case NotPermittedError():
            return 403, "not-permitted", "Not permitted by the trust model"
        case AppendRejectedError():
            return 409, "rejected", "Event contradicts the ledger"
        case EventValidationError():
            return 422, "invalid-event", "Invalid event"
        case VerificationError():
            return 500, "ledger-does-not-verify", "The stored ledger does not verify"
        case StoreUnavailableError():
            return 503, "unavailable", "Ledger unavailable"
    return 500, "internal", "Internal error"


def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    path = request.url.path
    if isinstance(exc, ProblemError):
        return problem(
            exc.status, exc.slug, exc.title, exc.detail, path, headers=exc.headers, **exc.extra
        )
    if isinstance(exc, LedgerError):
        status, slug, title = _ledger(exc)
        return problem(status, slug, title, str(exc), path)
    if isinstance(exc, DelegationError):
        return problem(
            422, "invalid-delegation", "Delegation rejected", str(exc), path, reason=exc.reason
        )
    if isinstance(exc, ReadStoreError):
        return problem(503, "unavailable", "Read store unavailable", str(exc), path)
    if isinstance(exc, ProjectionError):
        return problem(422, "invalid", "Invalid request", str(exc), path)
    if isinstance(exc, RecursionError):  # msgspec decoding JSON nested thousands deep
        return problem(400, "invalid-request", "Invalid request", "JSON nested too deeply", path)
    if isinstance(exc, ValidationException):
        return problem(400, "invalid-request", "Invalid request", _validation_detail(exc), path)
    if isinstance(exc, HTTPException):
        title = {
            404: "Not found",
            405: "Method not allowed",
            413: "Request body too large",
            401: "Unauthorized",
            403: "Forbidden",
        }.get(exc.status_code, "HTTP error")
        # Litestar's own headers, e.g. the ``Allow`` a 405 must carry (RFC 9110 §15.5.6).
        return problem(
            exc.status_code,
            title.lower().replace(" ", "-"),
            title,
            str(exc.detail),
            path,
            headers=exc.headers,
        )
    log.exception("unhandled_error", extra={"path": path})
    return problem(500, "internal", "Internal error", "the server failed; see its logs", path)


def _validation_detail(exc: ValidationException) -> str:
    extra = exc.extra if isinstance(exc.extra, list) else []
    messages = [
        f"{e.get('key', '')}: {e.get('message', '')}".strip(": ")
        for e in extra
        if isinstance(e, dict)
    ]
    return "; ".join(messages) or str(exc.detail)


def not_found(what: str) -> ProblemError:
    return ProblemError(404, "not-found", "Not found", what)


def bad_request(detail: str) -> ProblemError:
    return ProblemError(400, "invalid-request", "Invalid request", detail)
