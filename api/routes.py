"""Route handlers. Each is thin: parse, authorize, call the ledger or the reader, shape."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, HeaderParameter, JSONBody, QueryParameter

from api import schemas as s
from api.context import ApiContext
from api.errors import ProblemError, bad_request, not_found
from api.handshakes import decode_signature
from api.metrics import HANDSHAKES
from ledger import tlog
from ledger.canonical import canonical_bytes
from ledger.chain import AppendResult
from ledger.errors import LedgerError, ProofError, SignatureError, StoreUnavailableError
from ledger.events import (
    AgentKeyRotated,
    AgentRegistered,
    AgentReinstated,
    AgentSuspended,
    DelegationGranted,
    DelegationRevoked,
    HandshakeCompleted,
    HandshakeFailed,
    PolicyViolation,
    TrustSignal,
)
from ledger.identity import VerifyKey, b64encode, is_did
from ledger.signed import SignedEvent
from ledger.timefmt import format_time, parse_time
from projections.delegation import is_active, validate_grant, validate_revocation
from projections.documents import agent_record, decode, decode_trust_only
from projections.history import FoldLimits, FoldTooLargeError, state_at
from projections.start import Start, ledger_start

Ctx = NamedDependency[ApiContext]
Auth = Annotated[str | None, HeaderParameter(name="Authorization", required=False)]
PROOF_TYPE = "agentmesh.registration"
HANDSHAKE_REQUEST_SKEW = timedelta(minutes=5)


def appended(result: AppendResult) -> s.Appended:
    return s.Appended(
        position=result.positions[-1],
        stream_id=result.stream_id,
        stream_version=result.stream_version,
        duplicate=result.duplicate,
    )


def _did(did: str) -> str:
    if not is_did(did):
        raise bad_request(f"{did!r} is not a DID like did:mesh:<32 hex>")
    return did


def _time(value: str | None, ctx: ApiContext) -> Any:
    if value is None:
        return ctx.now()
    try:
        return parse_time(value)
    except (ValueError, OverflowError) as exc:  # 9999-12-31T23:59:59-05:00 overflows
        raise bad_request(f"{value!r} is not a usable RFC 3339 time: {exc}") from None


def _signed(data: s.SignedEventIn, *types: type) -> SignedEvent:
    signed = SignedEvent.from_wire(data.body, data.signature)
    if not isinstance(signed.event, types):
        names = ", ".join(str(t.__struct_config__.tag) for t in types)  # type: ignore[attr-defined]
        raise bad_request(f"expected an event of type {names}, got {signed.type}")
    return signed


# -- health -----------------------------------------------------------------------------


@get("/health", sync_to_thread=False, tags=["health"])
def health() -> s.Status:
    """Liveness: the process answers. No dependency is checked."""
    return s.Status("healthy")


@get("/ready", tags=["health"])
async def ready(ctx: Ctx) -> Response[Any]:
    """Readiness: PostgreSQL and the read store answer, migrations are at head."""
    try:
        revision = await ctx.ledger.schema_revision()
    except Exception as exc:  # any failure to read it means "not ready"
        return _not_ready(f"PostgreSQL: {type(exc).__name__}: {exc}")
    if revision != ctx.expected_revision:
        return _not_ready(
            f"migrations at {revision}, expected {ctx.expected_revision}: run agentmesh db upgrade"
        )
    try:
        await ctx.reader.store.meta()
    except Exception as exc:
        return _not_ready(f"read store ({ctx.reader.store.name}): {exc}")
    return Response(s.Status("ready"))


def _not_ready(reason: str) -> Response[Any]:
    body = {
        "type": "https://agentmesh.dev/problems/not-ready",
        "title": "Not ready",
        "status": 503,
        "detail": reason,
        "instance": "/ready",
    }
    return Response(body, status_code=503, media_type="application/problem+json")


# -- agents -----------------------------------------------------------------------------


@post("/v1/agents", tags=["agents"], status_code=201)
async def register_agent(
    ctx: Ctx,
    data: JSONBody[s.RegisterAgent],
    authorization: Auth = None,
    proof: Annotated[
        str | None, HeaderParameter(name="X-Registration-Proof", required=False)
    ] = None,
) -> s.Registered:
    """Register a public key (admin). On a fresh install, the first agent may
    register itself with ``X-Registration-Proof``: its base64 signature over
    ``{"public_key": <PEM>, "type": "agentmesh.registration"}`` (RFC 8785)."""
    try:
        key = VerifyKey.from_pem(data.public_key)
    except SignatureError as exc:
        raise bad_request(str(exc)) from None
    bootstrap = not ctx.is_admin(authorization)
    if bootstrap:
        if proof is None:
            ctx.require_admin(authorization)
        assert proof is not None  # require_admin raised otherwise
        _check_proof(key, data.public_key, proof)
    event = AgentRegistered(
        actor=ctx.ledger.ledger_did,
        occurred_at=format_time(ctx.now()),
        did=key.did,
        public_key=key.pem(),
        sponsor=data.sponsor,
        capabilities=tuple(data.capabilities),
        metadata=dict(data.metadata),
    )
    # Without the admin token this is the bootstrap: the ledger appends it only while
    # it holds no registration, decided under its append lock (never from a
    # projection, which may be empty while it rebuilds).
    result = await ctx.ledger.append([ctx.ledger.sign_own(event)], bootstrap=bootstrap)
    return s.Registered(did=key.did, position=result.positions[0])


def _check_proof(key: VerifyKey, pem: str, proof: str) -> None:
    signature = decode_signature(proof)
    message = canonical_bytes({"type": PROOF_TYPE, "public_key": pem})
    if signature is None or not key.is_valid(signature, message):
        raise ProblemError(403, "forbidden", "Forbidden", "registration proof does not verify")


@get("/v1/agents", tags=["agents"])
async def list_agents(
    ctx: Ctx,
    cursor: FromQuery[str | None] = None,
    tier: FromQuery[str | None] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
) -> s.AgentPageOut:
    """Registered agents in DID order, with their trust now (``?tier=`` filters)."""
    now = ctx.now()
    try:
        page = await ctx.reader.agents(now, after=cursor, limit=limit, tier=tier)
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    at = format_time(now)
    return s.AgentPageOut(
        items=[s.summary_out(a, at) for a in page.agents], next_cursor=page.next_cursor
    )


@get("/v1/agents/{did:str}", tags=["agents"])
async def get_agent(ctx: Ctx, did: FromPath[str]) -> s.AgentWithTrust:
    now = ctx.now()
    (raw,) = await ctx.reader.store.agent_docs([_did(did)])  # one read: record and trust
    if raw is None:
        raise not_found(f"agent {did} is not registered")
    view = decode_trust_only(raw).view(ctx.reader.config, now)
    record = agent_record(decode(raw))
    return s.AgentWithTrust(agent=s.agent_out(record), trust=s.trust_out(view, format_time(now)))


@get("/v1/agents/{did:str}/trust", tags=["agents"])
async def get_trust(ctx: Ctx, did: FromPath[str], at: FromQuery[str | None] = None) -> s.TrustOut:
    """Trust now, or ``?at=<RFC 3339>``: the ledger up to that moment folded with
    the projections' pure fold (what a replay gives): the agent's events and those
    of every peer whose standing weighed a report about it."""
    _did(did)
    if at is None:
        now = ctx.now()
        (raw,) = await ctx.reader.store.agent_docs([did])
        if raw is None:
            raise not_found(f"agent {did} is not registered")
        return s.trust_out(decode_trust_only(raw).view(ctx.reader.config, now), format_time(now))
    moment = _time(at, ctx)
    start = await _retained_start(ctx, moment)
    async with _fold_slot(ctx):
        try:
            state = await state_at(
                ctx.lagging_reads,
                did,
                moment,
                ledger_did=ctx.ledger.ledger_did,
                config=ctx.config,
                start=start,
                limits=AT_LIMITS,
            )
        except FoldTooLargeError as exc:
            raise ProblemError(
                422,
                "fold-too-large",
                "Moment too large to fold here",
                f"{exc}: ?at= folds at most {AT_LIMITS.events:,} ledger entries over "
                f"{AT_LIMITS.agents:,} agents per request; replay the moment from the "
                f"ledger instead: agentmesh replay agent {did} --to {format_time(moment)} "
                f"(or agentmesh replay state --at {format_time(moment)})",
            ) from None
    view = state.trust_view(did, moment)
    if view is None:
        raise not_found(f"agent {did} was not registered at {at}")
    return s.trust_out(view, format_time(moment))


# What one ``?at=`` may cost (anyone may ask, no credential): the fold reads each agent
# of the closure with at least one query and every entry it reads is decoded and folded
# (~35 µs an entry), so these bound a request to a few seconds of one connection. A
# worker runs one such fold at a time; a second waits for it up to AT_WAIT_SECONDS.
AT_LIMITS = FoldLimits(events=50_000, agents=100)
AT_WAIT_SECONDS = 5.0


@contextlib.asynccontextmanager
async def _fold_slot(ctx: ApiContext) -> AsyncIterator[None]:
    """This worker's one ``?at=`` fold at a time; 503 with Retry-After when it stays
    busy for AT_WAIT_SECONDS."""
    try:
        await asyncio.wait_for(ctx.folds.acquire(), AT_WAIT_SECONDS)
    except TimeoutError:
        raise ProblemError(
            503,
            "busy",
            "Busy",
            "another ?at= fold is running in this API process; retry shortly",
            headers={"Retry-After": str(max(1, math.ceil(AT_WAIT_SECONDS)))},
        ) from None
    try:
        yield
    finally:
        ctx.folds.release()


async def _retained_start(ctx: ApiContext, moment: Any) -> Start:
    """Where the stored ledger starts (``projections.start``); 410 for a moment
    before a retention cut."""
    start = await ledger_start(ctx.lagging_reads)
    if start.cut_time is not None and moment < start.cut_time:
        raise ProblemError(
            410,
            "before-retention-window",
            "Before the retention window",
            f"{format_time(moment)} is before the retention window: events recorded before "
            f"{format_time(start.cut_time)} were removed; the ledger keeps their snapshot only",
        )
    return start


@get("/v1/agents/{did:str}/events", tags=["agents"])
async def agent_events(
    ctx: Ctx,
    did: FromPath[str],
    after: Annotated[int, QueryParameter(ge=0, le=2**63 - 1)] = 0,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
) -> s.EventPage:
    """Ledger entries the agent signed or is the subject of, by position."""
    records = await ctx.lagging_reads.read_agent(_did(did), after, limit)
    return s.EventPage(
        items=[_event_out(r) for r in records],
        next_after=records[-1].position if len(records) == limit else None,
    )


def _event_out(record: Any) -> s.EventOut:
    return s.EventOut(
        position=record.position,
        recorded_at=format_time(record.recorded_at),
        stream_id=record.stream_id,
        stream_version=record.stream_version,
        type=record.event_type,
        actor=record.actor,
        body=msgspec.json.decode(record.body),
        signature=b64encode(record.signature),
        prev_hash=record.prev_hash.hex(),
        entry_hash=record.entry_hash.hex(),
    )


@post("/v1/agents/{did:str}/suspend", tags=["agents"], status_code=200)
async def suspend(
    ctx: Ctx,
    did: FromPath[str],
    data: JSONBody[s.AdminReason | None] = None,
    authorization: Auth = None,
) -> s.Appended:
    """Suspend an agent (admin); the body ``{"reason": …}`` is optional."""
    reason = data.reason if data is not None else ""
    return await _set_status(ctx, AgentSuspended, did, reason, authorization)


@post("/v1/agents/{did:str}/reinstate", tags=["agents"], status_code=200)
async def reinstate(
    ctx: Ctx,
    did: FromPath[str],
    data: JSONBody[s.AdminReason | None] = None,
    authorization: Auth = None,
) -> s.Appended:
    """Reinstate a suspended agent (admin); the body ``{"reason": …}`` is optional."""
    reason = data.reason if data is not None else ""
    return await _set_status(ctx, AgentReinstated, did, reason, authorization)


async def _set_status(
    ctx: ApiContext,
    kind: type[AgentSuspended] | type[AgentReinstated],
    did: str,
    reason: str,
    authorization: str | None,
) -> s.Appended:
    """An admin's suspension or reinstatement, signed by the ledger."""
    ctx.require_admin(authorization)
    await _require_agent(ctx, did)
    event = kind(
        actor=ctx.ledger.ledger_did, occurred_at=format_time(ctx.now()), did=did, reason=reason
    )
    return appended(await ctx.ledger.append_own(event))


async def _require_agent(ctx: ApiContext, did: str) -> None:
    if await ctx.ledger.current_key(_did(did)) is None:
        raise not_found(f"agent {did} is not registered")


@post("/v1/agents/{did:str}/keys", tags=["agents"], status_code=200)
async def rotate_key(ctx: Ctx, did: FromPath[str], data: JSONBody[s.SignedEventIn]) -> s.Appended:
    """Key rotation: an ``agent.key_rotated`` body signed with the *current* key,
    carrying ``proof``: the new key's signature over the body without ``proof``."""
    signed = _signed(data, AgentKeyRotated)
    if signed.event.did != _did(did):  # type: ignore[union-attr]
        raise bad_request("the event's did differs from the path")
    return appended(await ctx.ledger.append([signed], idempotency_key=data.idempotency_key))


@get("/v1/agents/{did:str}/capabilities", tags=["delegations"])
async def capabilities(
    ctx: Ctx, did: FromPath[str], at: FromQuery[str | None] = None
) -> s.CapabilitiesOut:
    """Registered plus delegated capabilities (active, unexpired chains) now or ``?at=``."""
    moment = _time(at, ctx)
    if at is not None:  # like trust?at=: no answer for a moment before registration
        record = await ctx.reader.agent(_did(did))
        if record is not None and record.registered_at > moment:
            raise not_found(f"agent {did} was not registered at {at}")
    found = await ctx.reader.capabilities(_did(did), moment)
    if found is None:
        raise not_found(f"agent {did} is not registered")
    return s.CapabilitiesOut(did=did, at=format_time(moment), capabilities=list(found))


# -- reports ----------------------------------------------------------------------------


@post("/v1/violations", tags=["reports"], status_code=201)
async def report_violation(
    ctx: Ctx, data: JSONBody[dict[str, Any]], authorization: Auth = None
) -> s.Appended:
    """One ``policy.violation``: signed by the reporting agent (``{body, signature,
    idempotency_key?}``), or an admin call (``{agent, severity, rule, detail?}``)."""
    return await _report(ctx, data, authorization, PolicyViolation)


@post("/v1/signals", tags=["reports"], status_code=201)
async def report_signal(
    ctx: Ctx, data: JSONBody[dict[str, Any]], authorization: Auth = None
) -> s.Appended:
    """One ``trust.signal`` (positive behaviour), signed by an agent or by an admin call."""
    return await _report(ctx, data, authorization, TrustSignal)


async def _report(
    ctx: Ctx,
    data: dict[str, Any],
    authorization: str | None,
    kind: type[PolicyViolation] | type[TrustSignal],
) -> s.Appended:
    if "signature" in data or "body" in data:
        report = _convert(data, s.SignedEventIn)
        signed = _signed(report, kind)
        return appended(await ctx.ledger.append([signed], idempotency_key=report.idempotency_key))
    ctx.require_admin(authorization)
    now = format_time(ctx.now())
    event: PolicyViolation | TrustSignal
    if kind is PolicyViolation:
        admin = _convert(data, s.AdminViolation)
        event = PolicyViolation(
            actor=ctx.ledger.ledger_did,
            occurred_at=now,
            agent=admin.agent,
            severity=admin.severity,
            rule=admin.rule,
            detail=admin.detail,
        )
        key = admin.idempotency_key
    else:
        signal = _convert(data, s.AdminSignal)
        event = TrustSignal(
            actor=ctx.ledger.ledger_did,
            occurred_at=now,
            agent=signal.agent,
            signal=signal.signal,
            detail=signal.detail,
        )
        key = signal.idempotency_key
    return appended(await ctx.ledger.append_own(event, idempotency_key=key))


def _convert(data: Any, kind: Any) -> Any:
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise bad_request(str(exc)) from None


def _decode_json(raw: bytes, kind: Any) -> Any:
    try:
        return msgspec.json.decode(raw, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise bad_request(f"invalid JSON body: {exc}") from None
    except RecursionError:
        raise bad_request("invalid JSON body: nested too deeply") from None


@post("/v1/reports:batch", tags=["reports"], status_code=200)
async def report_batch(ctx: Ctx, data: JSONBody[s.ReportBatch]) -> s.BatchResult:
    """Up to 1,000 signed reports (violations, signals), each with an idempotency
    key; answered per report. All are appended concurrently, so they share
    group commits. A retried batch appends nothing twice."""
    results = await asyncio.gather(
        *(_one_report(ctx, index, report) for index, report in enumerate(data.reports))
    )
    counts = {k: sum(r.status == k for r in results) for k in ("appended", "duplicate", "rejected")}
    return s.BatchResult(
        appended=counts["appended"],
        duplicates=counts["duplicate"],
        rejected=counts["rejected"],
        results=list(results),
    )


async def _one_report(ctx: ApiContext, index: int, item: dict[str, Any]) -> s.ReportResult:
    try:
        report: s.SignedEventIn = _convert(item, s.SignedEventIn)
    except ProblemError as exc:
        return s.ReportResult(index=index, status="rejected", error=exc.detail)
    if report.idempotency_key is None:
        return s.ReportResult(
            index=index, status="rejected", error="every report in a batch needs an idempotency_key"
        )
    try:
        signed = _signed(report, PolicyViolation, TrustSignal)
        result = await ctx.ledger.append([signed], idempotency_key=report.idempotency_key)
    except StoreUnavailableError:
        raise  # the whole batch is answered 503 and retried; a report is not at fault
    except (LedgerError, ProblemError) as exc:
        return s.ReportResult(index=index, status="rejected", error=str(exc))
    return s.ReportResult(
        index=index,
        status="duplicate" if result.duplicate else "appended",
        position=result.positions[0],
    )


# -- handshakes ---------------------------------------------------------------------------


@post("/v1/handshakes", tags=["handshakes"], status_code=201)
async def start_handshake(
    ctx: Ctx, data: JSONBody[dict[str, Any]], authorization: Auth = None
) -> s.Challenge:
    """Issue a challenge (30 s) for ``responder`` to sign. The start is signed by
    the initiator (``{body: HandshakeRequest, signature}``) or made by an admin
    (``{initiator, responder, min_score?}`` with the bearer token)."""
    now = ctx.now()
    request_id = None
    if "signature" in data or "body" in data:
        request = await _signed_handshake_request(ctx, data, now)
        initiator, responder, min_score = request.initiator, request.responder, request.min_score
        request_id = request.request_id
    else:
        ctx.require_admin(authorization)
        start = _convert(data, s.StartHandshake)
        initiator, responder, min_score = start.initiator, start.responder, start.min_score
    if initiator == responder:
        raise bad_request("an agent cannot handshake with itself")
    for did in (initiator, responder):
        await _require_agent(ctx, did)
    challenge = await ctx.handshakes.create(initiator, responder, min_score, now, request_id)
    if challenge is None:
        raise ProblemError(
            409, "replayed", "Request already used", f"handshake request {request_id} was used"
        )
    return s.Challenge(
        handshake_id=challenge.handshake_id,
        nonce=challenge.nonce,
        expires_at=format_time(challenge.expires_at),
        to_sign=challenge.to_sign,
    )


async def _signed_handshake_request(
    ctx: ApiContext, data: dict[str, Any], now: Any
) -> s.HandshakeRequest:
    """The initiator's signed start: fresh, single-use, by an active agent's current key."""
    wire = _convert(data, s.SignedHandshakeRequest)
    request: s.HandshakeRequest = _convert(wire.body, s.HandshakeRequest)
    moment = _time(request.requested_at, ctx)
    if abs(moment - now) > HANDSHAKE_REQUEST_SKEW:
        raise bad_request("requested_at must be within 5 minutes of the server's clock")
    key = await ctx.ledger.current_key(request.initiator)
    raw = decode_signature(wire.signature)
    if key is None or raw is None or not key.is_valid(raw, canonical_bytes(wire.body)):
        raise ProblemError(
            403, "forbidden", "Forbidden", "the request is not signed by the initiator's key"
        )
    record = await ctx.reader.agent(request.initiator)
    if record is None or record.status != "active":
        raise ProblemError(
            403, "not-permitted", "Not permitted by the trust model", "the initiator is not active"
        )
    return request


@post("/v1/handshakes/{handshake_id:str}/response", tags=["handshakes"], status_code=200)
async def answer_handshake(
    ctx: Ctx, handshake_id: FromPath[str], data: JSONBody[s.HandshakeAnswer]
) -> s.HandshakeResult:
    """Verify the responder's signature; record and answer the outcome."""
    _convert(handshake_id, s.HandshakeId)  # anything else cannot exist (and stays out of SQL)
    challenge = await ctx.handshakes.get(handshake_id)
    if challenge is None:
        raise not_found(f"handshake {handshake_id} does not exist")
    now = ctx.now()
    reason = await _handshake_failure(ctx, challenge, data.signature, now)
    view = await ctx.reader.trust(challenge.responder, now)
    responder = s.ResponderOut(
        did=challenge.responder,
        score=view.score if view else None,
        tier=view.tier if view else None,
    )
    stamp = format_time(now)
    if reason is None:
        await ctx.ledger.append_own(
            HandshakeCompleted(
                actor=ctx.ledger.ledger_did,
                occurred_at=stamp,
                handshake_id=handshake_id,
                initiator=challenge.initiator,
                responder=challenge.responder,
                score=view.score if view else None,
            )
        )
        HANDSHAKES.labels("verified", "ok", "false").inc()
        return s.HandshakeResult(verified=True, responder=responder)
    shadow = ctx.shadow_mode
    await ctx.ledger.append_own(
        HandshakeFailed(
            actor=ctx.ledger.ledger_did,
            occurred_at=stamp,
            handshake_id=handshake_id,
            initiator=challenge.initiator,
            responder=challenge.responder,
            reason=reason,
            shadow=shadow,
        )
    )
    HANDSHAKES.labels("failed", reason, str(shadow).lower()).inc()
    if shadow:  # decided and recorded as a failure, but not enforced
        return s.HandshakeResult(verified=True, responder=responder, reason=reason, shadow=True)
    return s.HandshakeResult(verified=False, responder=responder, reason=reason)


async def _handshake_failure(ctx: Ctx, challenge: Any, signature: str, now: Any) -> str | None:
    """The first reason the handshake fails, or None when it is verified."""
    # 1. The nonce works once: consume it first, whatever else is wrong.
    if not await ctx.handshakes.consume(challenge.handshake_id, now):
        return "nonce_reused"
    if now > challenge.expires_at:
        return "expired"
    # 2. The signature must be the responder's current key over the exact bytes.
    key = await ctx.ledger.current_key(challenge.responder)
    raw = decode_signature(signature)
    if key is None or raw is None or not key.is_valid(raw, challenge.signed_bytes()):
        return "bad_signature"
    # 3. Both agents active; the responder trusted enough.
    for role, did in (("initiator", challenge.initiator), ("responder", challenge.responder)):
        record = await ctx.reader.agent(did)
        if record is None or record.status != "active":
            return f"{role}_suspended"
    view = await ctx.reader.trust(challenge.responder, now)
    needed = max(challenge.min_score or 0, ctx.config.min_threshold)
    if view is None or view.score < needed:
        return "score_too_low"
    return None


# -- delegations --------------------------------------------------------------------------


@post("/v1/delegations", tags=["delegations"], status_code=201)
async def grant_delegation(ctx: Ctx, data: JSONBody[s.SignedEventIn]) -> s.DelegationCreated:
    """A ``delegation.granted`` body signed by its delegator, checked by the
    projections' delegation rules before it reaches the ledger."""
    signed = _signed(data, DelegationGranted)
    event: DelegationGranted = signed.event  # type: ignore[assignment]
    parents = [event.parent] if event.parent else []
    context = await ctx.reader.context(
        [event.delegator, event.delegatee], [event.grant_id, *parents]
    )
    validate_grant(context, event, ctx.now())
    result = await ctx.ledger.append([signed], idempotency_key=data.idempotency_key)
    depth = 1 if not parents else context.delegations.grants[parents[0]].depth + 1
    return s.DelegationCreated(grant_id=event.grant_id, depth=depth, position=result.positions[0])


@get("/v1/delegations/{grant_id:str}", tags=["delegations"])
async def get_delegation(ctx: Ctx, grant_id: FromPath[str]) -> s.ChainOut:
    """The grant and its chain to the root, each link's signature verified."""
    chain = await ctx.reader.delegation_chain(grant_id)
    if chain is None:
        raise not_found(f"grant {grant_id} does not exist")
    context = await ctx.reader.context([], [grant_id])
    now = ctx.now()
    links = []
    for grant in chain:
        verified = await _link_verified(ctx, grant)
        links.append(s.grant_out(grant, is_active(context, grant, now), verified))
    return s.ChainOut(
        grant_id=grant_id, chain=links, valid=all(link.signature_verified for link in links)
    )


async def _link_verified(ctx: ApiContext, grant: Any) -> bool:
    """Re-check the ledger entry that granted this link against its delegator's key."""
    record = await ctx.ledger.entry_at(grant.granted_position)
    if record is None or record.event_type != "delegation.granted":
        return False
    raw = await ctx.ledger.key_before(grant.delegator, grant.granted_position)
    return raw is not None and VerifyKey.from_raw(raw).is_valid(record.signature, record.body)


@delete("/v1/delegations/{grant_id:str}", tags=["delegations"], status_code=200)
async def revoke_delegation(
    ctx: Ctx, request: Request[Any, Any, Any], grant_id: FromPath[str], authorization: Auth = None
) -> s.Revoked:
    """Revoke a grant and its whole subtree: a ``delegation.revoked`` body signed by
    the delegator, or (no body) an admin call."""
    raw = await request.body()
    context = await ctx.reader.context([], [grant_id])
    if raw.strip():
        data = _decode_json(raw, s.SignedEventIn)
        signed = _signed(data, DelegationRevoked)
        if signed.event.grant_id != grant_id:  # type: ignore[union-attr]
            raise bad_request("the event's grant_id differs from the path")
        validate_revocation(context, grant_id, signed.actor, ctx.ledger.ledger_did)
    else:
        ctx.require_admin(authorization)
        validate_revocation(context, grant_id, ctx.ledger.ledger_did, ctx.ledger.ledger_did)
        signed = ctx.ledger.sign_own(
            DelegationRevoked(
                actor=ctx.ledger.ledger_did,
                occurred_at=format_time(ctx.now()),
                grant_id=grant_id,
                reason="revoked by an administrator",
            )
        )
    result = await ctx.ledger.append([signed])
    subtree = await ctx.reader.subtree(grant_id)
    return s.Revoked(grant_id=grant_id, revoked=subtree, position=result.positions[0])


# -- ledger ---------------------------------------------------------------------------------


@get("/v1/ledger/head", tags=["ledger"])
async def ledger_head(ctx: Ctx) -> s.HeadOut:
    head = await ctx.ledger.head()
    return s.HeadOut(
        position=head.position,
        entry_hash=head.entry_hash.hex(),
        recorded_at=format_time(head.recorded_at),
    )


# -- the transparency log (ledger/tlog.py) -------------------------------------------


@get("/v1/ledger/checkpoint", tags=["ledger"], media_type="text/plain; charset=utf-8")
async def tree_head(ctx: Ctx) -> str:
    """The latest checkpoint as a C2SP signed note (``tlog-checkpoint``: origin
    ``agentmesh.ledger/<ledger DID>``, tree size, base64 Merkle root; signed with
    the ledger key). What witnesses follow: ``agentmesh witness``."""
    note = await ctx.ledger.latest_tree_head()
    if note is None:
        await ctx.ledger.checkpoint()
        note = await ctx.ledger.latest_tree_head()
    assert note is not None  # a checkpoint was just signed
    return note


@get("/v1/ledger/vkey", tags=["ledger"], media_type="text/plain; charset=utf-8")
async def tree_vkey(ctx: Ctx) -> str:
    """The note verifier key of the ledger's checkpoints (``name+keyid+key``). Pin it out
    of band: fetching it from the server you are checking proves nothing."""
    return tlog.verifier(ctx.ledger.ledger_key).vkey() + "\n"


@get("/v1/ledger/proofs/inclusion", tags=["ledger"])
async def inclusion_proof(
    ctx: Ctx,
    position: Annotated[int, QueryParameter(ge=1, le=2**63 - 1)],
    tree_size: Annotated[int, QueryParameter(ge=1, le=2**63 - 1)],
) -> s.InclusionProofOut:
    """RFC 9162 §2.1.3 audit path of the entry at ``position`` (leaf ``position - 1``)
    in the tree of ``tree_size`` entries; hashes in base64."""
    hashes = await ctx.ledger.inclusion_proof(position, tree_size)
    entry = await ctx.ledger.entry_at(position)
    if entry is None:
        raise not_found(f"no entry at position {position}")
    return s.InclusionProofOut(
        position=position,
        leaf_index=position - 1,
        tree_size=tree_size,
        leaf_hash=b64encode(tlog.entry_leaf(entry.entry_hash)),
        hashes=[b64encode(h) for h in hashes],
    )


@get("/v1/ledger/proofs/consistency", tags=["ledger"])
async def consistency_proof(
    ctx: Ctx,
    first: Annotated[int, QueryParameter(ge=1, le=2**63 - 1)],
    second: Annotated[int, QueryParameter(ge=1, le=2**63 - 1)],
) -> s.ConsistencyProofOut:
    """RFC 9162 §2.1.4 proof that the tree of ``first`` entries is a prefix of the tree
    of ``second``; hashes in base64."""
    hashes = await ctx.ledger.consistency_proof(first, second)
    return s.ConsistencyProofOut(first=first, second=second, hashes=[b64encode(h) for h in hashes])


@get("/v1/ledger/keys", tags=["ledger"])
async def ledger_keys(
    ctx: Ctx,
    tree_size: Annotated[int | None, QueryParameter(ge=1, le=2**63 - 1)] = None,
) -> s.LedgerKeysOut:
    """The ledger's key rotations up to ``tree_size`` (default: the head), each entry with
    its inclusion proof in the tree of ``tree_size``: what a witness that pinned an
    older key needs to accept checkpoints signed by the new one."""
    head = (await ctx.ledger.head()).position
    if tree_size is not None and tree_size > head:
        raise ProofError(f"tree_size {tree_size} is past the head ({head} entries)")
    size = tree_size if tree_size is not None else head
    every = await ctx.ledger.ledger_rotations()
    rotations = [r for r in every if r.position <= size]
    out = []
    for entry in rotations:
        hashes = await ctx.ledger.inclusion_proof(entry.position, size)
        out.append(
            s.LedgerRotationOut(
                position=entry.position,
                recorded_at=format_time(entry.recorded_at),
                stream_id=entry.stream_id,
                stream_version=entry.stream_version,
                body=b64encode(entry.body),
                signature=b64encode(entry.signature),
                prev_hash=b64encode(entry.prev_hash),
                entry_hash=b64encode(entry.entry_hash),
                did=str(msgspec.json.decode(entry.body)["did"]),
                hashes=[b64encode(h) for h in hashes],
            )
        )
    # The key in force at ``size``: the last rotation's, else the one the first replaced.
    current = await ctx.ledger.ledger_identity() or ctx.ledger.ledger_key
    if rotations or every:
        last = msgspec.json.decode((rotations or every)[-1 if rotations else 0].body)
        current = VerifyKey.from_pem(last["public_key" if rotations else "previous_key"])
    return s.LedgerKeysOut(
        tree_size=size, ledger_did=current.did, public_key=current.pem(), rotations=out
    )


@get("/v1/ledger/checkpoints/latest", tags=["ledger"])
async def latest_checkpoint(ctx: Ctx) -> s.CheckpointOut:
    """The latest signed checkpoint, with the bytes signed and the ledger's public key."""
    checkpoint = await ctx.ledger.latest_checkpoint()
    if checkpoint is None:
        checkpoint = await ctx.ledger.checkpoint()
    return s.CheckpointOut(
        origin=checkpoint.origin,
        position=checkpoint.position,
        head_hash=checkpoint.head_hash,
        time=checkpoint.time,
        signer=checkpoint.signer,
        signature=checkpoint.signature,
        signed_bytes=b64encode(checkpoint.signed_bytes()),
        ledger_public_key=ctx.ledger.ledger_key.pem(),
    )


@get("/v1/ledger/events", tags=["ledger"])
async def ledger_events(
    ctx: Ctx,
    after: Annotated[int, QueryParameter(ge=0, le=2**63 - 1)] = 0,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    authorization: Auth = None,
) -> s.EventPage:
    """Entries after a position (admin)."""
    ctx.require_admin(authorization)
    records = await ctx.lagging_reads.read(after, limit)
    return s.EventPage(
        items=[_event_out(r) for r in records],
        next_after=records[-1].position if len(records) == limit else None,
    )


# -- audit ------------------------------------------------------------------------------------


@get("/v1/audit/export", tags=["audit"])
async def audit_export(
    ctx: Ctx,
    from_: Annotated[str | None, QueryParameter(name="from", required=False)] = None,
    to: FromQuery[str | None] = None,
    agent: FromQuery[str | None] = None,
    fmt: Annotated[str, QueryParameter(name="format", required=False)] = "jsonl",
    authorization: Auth = None,
) -> Response[Any]:
    """An audit bundle of the events with ``from <= recorded_at < to`` (admin), streamed
    one JSON object per line: ``format=jsonl`` (default) or ``cloudevents`` (CloudEvents
    1.0). With ``agent``, events neither signed by nor about it become hash-only stubs.
    Anyone can verify it offline: ``agentmesh audit verify FILE``. A failure after
    the first bytes ends the stream early, and a truncated bundle fails verification."""
    from litestar.response import Stream

    from ledger.audit import MEDIA_TYPE, Exportable, parse_flavour, prepare_export
    from ledger.errors import VerificationError

    ctx.require_admin(authorization)
    ledger = ctx.ledger
    if not isinstance(ledger, Exportable):
        raise ProblemError(
            501,
            "audit-export-unavailable",
            "Audit export unavailable",
            "audit export reads the ledger's PostgreSQL tables; this ledger has none",
        )
    if from_ is None or to is None:
        raise bad_request("from and to are required: RFC 3339 times like 2026-11-26T12:00:00Z")
    try:
        start, end = parse_time(from_), parse_time(to)
        flavour = parse_flavour(fmt)
        # The covering checkpoint and the manifest are signed by the ledger key, through
        # the ledger's narrow Signer (DID, public key, sign).
        export = await prepare_export(
            ledger,
            ctx.ledger.signer,
            start=start,
            end=end,
            agent=agent,
            fmt=flavour,
            clock=ctx.clock,
        )
    except (ValueError, OverflowError) as exc:
        raise bad_request(str(exc)) from None
    except VerificationError as exc:
        raise ProblemError(
            500, "ledger-does-not-verify", "Ledger does not verify", str(exc)
        ) from None
    disposition = f'attachment; filename="{export.filename}"'
    return Stream(
        export.chunks(), media_type=MEDIA_TYPE, headers={"Content-Disposition": disposition}
    )


ROUTES = [
    health,
    ready,
    register_agent,
    list_agents,
    get_agent,
    get_trust,
    agent_events,
    suspend,
    reinstate,
    rotate_key,
    capabilities,
    report_violation,
    report_signal,
    report_batch,
    start_handshake,
    answer_handshake,
    grant_delegation,
    get_delegation,
    revoke_delegation,
    ledger_head,
    latest_checkpoint,
    tree_head,
    tree_vkey,
    inclusion_proof,
    consistency_proof,
    ledger_keys,
    ledger_events,
    audit_export,
]
