"""The OpenAPI document, corrected where Litestar cannot know the truth.

Litestar builds the document from the route handlers. This module then makes
it say what the API does (and what schemathesis' conformance checks hold it
to):

* every error is an RFC 9457 problem document (``application/problem+json``,
  schema ``Problem``), never Litestar's ``{status_code, detail, extra}``;
* each operation lists the error statuses it can answer (401/403 where an
  admin token is accepted, 404 for a path naming something, 409/422 for
  writes, 410 for ``trust?at=`` before the retention window, …);
* the bearer token is a security scheme (``bearerAuth``);
* handlers that take either a signed event or an admin call (violations,
  signals, handshakes, revocations) get typed request bodies (``oneOf``).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from api import schemas as s
from ledger.events import DelegationRevoked, PolicyViolation, TrustSignal

REF = "#/components/schemas/{name}"
PROBLEM = "application/problem+json"


class Problem(msgspec.Struct, kw_only=True):
    """An RFC 9457 problem document. Rule refusals add ``reason`` (a code such as
    ``widening`` or ``too_deep``); other members may be added."""

    type: str
    title: str
    status: int
    detail: str
    instance: str
    reason: str | None = None


class SignedViolation(msgspec.Struct, kw_only=True):
    """A ``policy.violation`` body as its reporter signed it (base64 Ed25519 over the
    body's RFC 8785 bytes)."""

    body: PolicyViolation
    signature: s.Signature
    idempotency_key: s.Key | None = None


class SignedSignal(msgspec.Struct, kw_only=True):
    """A ``trust.signal`` body as its reporter signed it."""

    body: TrustSignal
    signature: s.Signature
    idempotency_key: s.Key | None = None


class SignedRevocation(msgspec.Struct, kw_only=True):
    """A ``delegation.revoked`` body signed by the grant's delegator."""

    body: DelegationRevoked
    signature: s.Signature
    idempotency_key: s.Key | None = None


_TITLES = {
    400: "Invalid request (a problem document)",
    401: "No credential: an admin bearer token is needed (a problem document)",
    403: "Wrong credential, or not permitted by the trust model (a problem document)",
    404: "Not found (a problem document)",
    409: "Conflicts with the ledger: already registered, replayed, version or "
    "idempotency conflict (a problem document)",
    410: "Before the retention window (a problem document)",
    413: "Request body over 2 MiB (a problem document)",
    422: "Signature or event rejected, a delegation rule refused it (a problem "
    "document with `reason`), or a `?at=` moment too large to fold per request",
    503: "PostgreSQL or the read store unavailable, or busy with another `?at=` fold "
    "(a problem document; Retry-After)",
}

Auth = Literal["none", "admin", "either"]

# (method, path) -> who may call it: an admin token only, or an agent's signature /
# the public too ("either": a token is accepted but not required).
_AUTH: dict[tuple[str, str], Auth] = {
    ("post", "/v1/agents"): "either",  # admin, or the first agent registering itself
    ("post", "/v1/agents/{did}/suspend"): "admin",
    ("post", "/v1/agents/{did}/reinstate"): "admin",
    ("post", "/v1/violations"): "either",
    ("post", "/v1/signals"): "either",
    ("post", "/v1/handshakes"): "either",
    ("delete", "/v1/delegations/{grant_id}"): "either",
    ("get", "/v1/ledger/events"): "admin",
    ("get", "/v1/audit/export"): "admin",
}

# Wire types of a signed handshake start, where this version of the API has them.
_SIGNED_HANDSHAKE = [
    kind for kind in (getattr(s, "SignedHandshakeRequest", None),) if kind is not None
]


_BODIES: dict[tuple[str, str], list[str]] = {
    ("post", "/v1/violations"): ["SignedViolation", "AdminViolation"],
    ("post", "/v1/signals"): ["SignedSignal", "AdminSignal"],
    ("post", "/v1/handshakes"): [k.__name__ for k in _SIGNED_HANDSHAKE] + ["StartHandshake"],
    ("delete", "/v1/delegations/{grant_id}"): ["SignedRevocation"],
}


def _components() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [
            Problem,
            SignedViolation,
            SignedSignal,
            SignedRevocation,
            s.AdminViolation,
            s.AdminSignal,
            s.StartHandshake,
            *_SIGNED_HANDSHAKE,
        ],
        ref_template=REF,
    )
    problem = components["Problem"]
    problem["additionalProperties"] = True
    return components


def _statuses(method: str, path: str, operation: dict[str, Any]) -> set[int]:
    if path == "/health":
        return set()
    if path == "/ready":
        return {503}
    codes = {503}
    if operation.get("parameters") or "requestBody" in operation or method != "get":
        codes.add(400)
    if "{" in path:
        codes.add(404)
    if method in ("post", "delete"):
        codes |= {403, 404, 409, 413, 422}
    if _AUTH.get((method, path), "none") != "none":
        codes |= {401, 403}
    if path == "/v1/agents/{did}/trust":
        codes |= {410, 422}  # before the retention window; ?at= too large to fold here
    return codes


def document(openapi: dict[str, Any]) -> None:
    """Correct ``openapi`` (Litestar's document as a dict) in place."""
    components = openapi.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(_components())
    components.setdefault("securitySchemes", {})["bearerAuth"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "The admin token (AGENTMESH_ADMIN_TOKEN). Agent writes are "
        "authenticated by their Ed25519 signatures instead.",
    }
    problem = {PROBLEM: {"schema": {"$ref": REF.format(name="Problem")}}}
    for path, item in openapi.get("paths", {}).items():
        for method, operation in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            responses = operation.setdefault("responses", {})
            for code in [c for c in responses if c[:1] in ("4", "5")]:
                del responses[code]  # Litestar's {status_code, detail, extra}: not what we send
            for code in sorted(_statuses(method, path, operation)):
                responses[str(code)] = {"description": _TITLES[code], "content": problem}
            auth = _AUTH.get((method, path), "none")
            if auth == "admin":
                operation["security"] = [{"bearerAuth": []}]
            elif auth == "either":
                operation["security"] = [{}, {"bearerAuth": []}]
            if (method, path) in _BODIES:
                refs = [{"$ref": REF.format(name=n)} for n in _BODIES[(method, path)]]
                body_schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
                operation["requestBody"] = {
                    "required": method != "delete",
                    "content": {"application/json": {"schema": body_schema}},
                }
