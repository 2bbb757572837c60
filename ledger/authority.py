"""Who may sign what: the ledger's write rules, pure (no I/O, no clock).

One module decides whether an event may enter the ledger, and the same code
re-decides it wherever the ledger is verified: ``PostgresEventStore`` checks
every append under the ledger lock; ``agentmesh ledger verify`` and
``agentmesh audit verify`` replay the rules entry by entry, so an offline
verifier re-checks everything append enforced. The state the rules need is
a ``WriteView``: the store answers it from its tables inside the append
transaction, the verifiers from an ``AuthorityState`` they fold as they go.

The rules (numbered as the README's trust model table):

1. Every event carries an ``event_id`` chosen by its signer; ``(actor,
   event_id)`` is unique among the events that occurred on the same UTC day
   (``single_use_day``). A signed body is single-use: a replay carries the
   same ``occurred_at``, so it is refused (``ReplayError``), never appended
   twice.
2. Every timestamp in a body is a real RFC 3339 time; ``occurred_at`` lies
   within ``MAX_FUTURE_SKEW`` after and ``MAX_AGE`` before the ledger's own
   clock at append (``recorded_at``). Replays of bodies older than
   ``MAX_AGE`` are stale, so the replay index only needs the days that are
   not (``single_use_horizon``): a store drops older days whole.
3. Only the ledger signs what the server decides: suspensions,
   reinstatements, handshake outcomes, retention markers.
4. A signer other than the ledger is a registered, active agent: a
   suspended agent writes nothing — except what its own sidecar reports about
   it (a ``policy.violation`` about itself), which can only lower its own score
   and is the evidence of what it tried while suspended.
5. ``agent.registered`` is signed by the ledger, or by the agent itself only
   while the ledger holds no registration (bootstrap), and the key must hash
   to the DID.
6. ``agent.key_rotated`` is signed by the agent's current key *and* carries
   ``proof``: the new key's signature over the body without ``proof``.
7. ``trust.signal`` about oneself is refused: no agent raises its own score.
8. ``delegation.granted`` is signed by its delegator.
9. Every agent an event is about is registered.
10. ``ledger.key_rotated`` is signed by the current ledger key (``previous_key`` is
    that key) and carries ``proof`` by the new key; the new DID is no agent's. From
    then on ``ledger_did`` is the new key's DID for every rule: the old key is an
    unknown signer, so it can sign nothing.

How much a *recorded* report moves a score (peer weighting, per-pair caps,
handshake reward windows) is the fold's business: ``projections.state``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Protocol

import msgspec

from ledger.canonical import canonical_bytes
from ledger.errors import (
    AppendRejectedError,
    EventValidationError,
    NotPermittedError,
    ReplayError,
    SignatureError,
)
from ledger.events import (
    AgentKeyRotated,
    AgentRegistered,
    AgentReinstated,
    AgentSuspended,
    AnyEvent,
    DelegationGranted,
    Event,
    HandshakeCompleted,
    HandshakeFailed,
    LedgerKeyRotated,
    PolicyViolation,
    RetentionApplied,
    TrustSignal,
    subject_agents,
)
from ledger.identity import VerifyKey, b64decode
from ledger.timefmt import parse_time

MAX_FUTURE_SKEW = timedelta(minutes=5)
"""How far ahead of the ledger's clock a signer's ``occurred_at`` may be."""
MAX_AGE = timedelta(days=7)
"""How old a signed body may be when it reaches the ledger (an outbox's backlog)."""


def single_use_day(event: Event) -> date | None:
    """The UTC day ``occurred_at`` falls on (None when it is not a time: such an
    event is refused). Single-use ids and idempotency keys are unique per signer
    and this day (rule 1): a replay or a retry resends the same bodies, so it
    meets what it repeats."""
    text = event.occurred_at
    try:
        if text[-1:] in ("Z", "z"):  # UTC already: the day is the date as written
            return date.fromisoformat(text[:10])
        return parse_time(text).date()
    except (ValueError, OverflowError):
        return None


def single_use_horizon(ledger_now: datetime) -> date:
    """The oldest UTC day whose single-use ids and idempotency keys a store must
    still hold when its clock (the head's ``recorded_at``; it never runs back)
    reads ``ledger_now``: a body that occurred on an earlier day is stale (rule
    2) by a margin of at least a day, so a replay of it is refused without the
    index."""
    return (ledger_now - MAX_AGE - timedelta(days=1)).date()


LEDGER_ONLY: tuple[type, ...] = (
    AgentSuspended,
    AgentReinstated,
    HandshakeCompleted,
    HandshakeFailed,
    RetentionApplied,
    LedgerKeyRotated,
)


class WriteView(Protocol):
    """The ledger state the rules read, as of just before the event."""

    @property
    def ledger_did(self) -> str: ...

    def key(self, did: str) -> bytes | None:
        """The agent's current raw public key, or None if not registered."""

    def suspended(self, did: str) -> bool: ...

    def has_agents(self) -> bool:
        """Whether any agent has ever been registered."""

    def seen(self, actor: str, event_id: str, day: date) -> bool:
        """Whether an event with this id by this signer, occurred on this UTC day, is
        already recorded."""


def check(event: AnyEvent, body: bytes, recorded_at: datetime, view: WriteView) -> None:
    """Return None if ``event`` (signed as ``body``) may be appended at
    ``recorded_at``; raise otherwise. The signature over ``body`` is the
    caller's to check, with the key ``view.key(actor)`` gives."""
    check_static(event, body, recorded_at, view.ledger_did)
    actor, is_ledger = event.actor, event.actor == view.ledger_did
    # 1. Single use.
    assert event.event_id is not None  # check_static refused it otherwise
    day = single_use_day(event)
    assert day is not None  # check_static refused it otherwise
    if view.seen(actor, event.event_id, day):
        raise ReplayError(f"event {event.event_id} by {actor} is already in the ledger")
    # 4-5. Who signs, as of now.
    if isinstance(event, AgentRegistered):
        _check_registration(event, is_ledger, view)
        return
    if not is_ledger:
        if view.key(actor) is None:
            raise SignatureError(f"{_type(event)}: unknown signer {actor}")
        if view.suspended(actor) and not _reports_itself(event):
            raise NotPermittedError(
                f"{actor} is suspended and can write nothing but violations about itself"
            )
    if isinstance(event, LedgerKeyRotated) and view.key(event.did) is not None:  # 10.
        raise AppendRejectedError(f"ledger.key_rotated: {event.did} is a registered agent")
    # 9. Subjects exist.
    for did in subject_agents(event):
        if view.key(did) is None:
            raise AppendRejectedError(f"{_type(event)}: agent {did} is not registered")


def check_static(event: AnyEvent, body: bytes, recorded_at: datetime, ledger_did: str) -> None:
    """The rules that need no ledger state (1-2 without the index, 3, 5-8), which a
    verifier of a filtered bundle can check on every event it shows."""
    check_body(event, recorded_at)
    actor = event.actor
    if isinstance(event, LEDGER_ONLY) and actor != ledger_did:  # 3.
        raise NotPermittedError(f"{_type(event)} can only be signed by the ledger")
    if isinstance(event, AgentRegistered) and actor not in (ledger_did, event.did):  # 5.
        raise NotPermittedError("an agent is registered by the ledger or by itself")
    if isinstance(event, AgentKeyRotated):  # 6.
        if actor != event.did:
            raise NotPermittedError("a key rotation is signed by the agent's current key")
        check_rotation_proof(event, body)
    if isinstance(event, LedgerKeyRotated):  # 10.
        check_ledger_rotation(event, body)
    if isinstance(event, TrustSignal) and actor == event.agent:  # 7.
        raise NotPermittedError("an agent cannot signal trust in itself")
    if isinstance(event, DelegationGranted) and actor != event.delegator:  # 8.
        raise NotPermittedError("a delegation is signed by its delegator")


def check_body(event: AnyEvent, recorded_at: datetime) -> None:
    """The rules that need no ledger state: id present, times real and fresh."""
    if event.event_id is None:
        raise EventValidationError(
            f"{_type(event)}: event_id is required (16-64 of A-Z a-z 0-9 _ -, unique per signer)"
        )
    for name, text in _times(event):
        try:
            moment = parse_time(text)
        except (ValueError, OverflowError) as exc:
            raise EventValidationError(
                f"{_type(event)}: {name} is not a real time: {exc}"
            ) from None
        if name == "occurred_at":
            _check_fresh(event, moment, recorded_at)


def _check_fresh(event: AnyEvent, moment: datetime, recorded_at: datetime) -> None:
    if moment > recorded_at + MAX_FUTURE_SKEW:
        raise EventValidationError(
            f"{_type(event)}: occurred_at is more than {_minutes(MAX_FUTURE_SKEW)} minutes "
            "ahead of the ledger's clock"
        )
    if moment < recorded_at - MAX_AGE:
        raise EventValidationError(
            f"{_type(event)}: occurred_at is more than {MAX_AGE.days} days old (stale)"
        )


def _times(event: AnyEvent) -> Iterable[tuple[str, str]]:
    yield "occurred_at", event.occurred_at
    if isinstance(event, DelegationGranted) and event.expires_at is not None:
        yield "expires_at", event.expires_at
    if isinstance(event, RetentionApplied):
        yield "cut_time", event.cut_time


def _reports_itself(event: AnyEvent) -> bool:
    return isinstance(event, PolicyViolation) and event.agent == event.actor


def _check_registration(event: AgentRegistered, is_ledger: bool, view: WriteView) -> None:
    if not is_ledger and view.has_agents():
        raise NotPermittedError("self-registration is only for the first agent of an empty ledger")
    key = _pem_key(event.public_key)
    if key.did != event.did:
        raise AppendRejectedError(f"public key belongs to {key.did}, not {event.did}")
    if view.key(event.did) is not None:
        raise AppendRejectedError(f"agent {event.did} is already registered")
    if event.sponsor is not None and view.key(event.sponsor) is None:
        raise AppendRejectedError(f"sponsor {event.sponsor} is not registered")


# -- key rotation: possession of the new key --------------------------------------------


def rotation_message(body: dict[str, object]) -> bytes:
    """The bytes the *new* key signs: the rotation body without ``proof``."""
    return canonical_bytes({k: v for k, v in body.items() if k != "proof"})


def check_rotation_proof(event: AgentKeyRotated | LedgerKeyRotated, body: bytes) -> None:
    """Return None if ``proof`` is the new key's signature over ``body`` (the signed
    canonical bytes) without ``proof``; raise ``SignatureError`` otherwise."""
    kind = _type(event)
    if event.proof is None:
        raise SignatureError(
            f"{kind} needs proof: the new key's signature over the body without proof"
        )
    key = _pem_key(event.public_key)
    message = rotation_message(msgspec.json.decode(body))
    if not key.is_valid(b64decode(event.proof, "proof"), message):
        raise SignatureError(f"{kind}: proof does not verify with the new key")


def check_ledger_rotation(event: LedgerKeyRotated, body: bytes) -> None:
    """The parts of rule 10 one event shows: ``previous_key`` is the signer's (the
    actor's) key, ``public_key`` is ``did``'s and another key, and the new key's proof."""
    if _pem_key(event.previous_key).did != event.actor:
        raise NotPermittedError("ledger.key_rotated: previous_key is not the signer's key")
    if _pem_key(event.public_key).did != event.did:
        raise AppendRejectedError(f"ledger.key_rotated: public key does not belong to {event.did}")
    if event.did == event.actor:
        raise AppendRejectedError("ledger.key_rotated: the new key is the current key")
    check_rotation_proof(event, body)


def _pem_key(pem: str) -> VerifyKey:
    return VerifyKey.from_pem(pem)


# -- a view folded in memory, for verifiers ------------------------------------------------


@dataclass
class AuthorityState:
    """The write-side state, folded entry by entry (what a verifier replays).

    ``complete`` is False when verification starts after the ledger's first
    entry (``--from``, or after a retention cut): ids recorded before the start
    are unknown, so replays are detected within the verified range only.
    ``ids`` holds ``(actor, event_id)`` per ``single_use_day``; ``forget_stale``
    lets go of the days no fresh body can fall on (what a store drops), so a
    verifier's memory is bounded by the freshness window, not the ledger.
    """

    ledger_did: str
    keys: dict[str, bytes] = field(default_factory=dict)
    suspended_dids: set[str] = field(default_factory=set)
    ids: dict[date, set[tuple[str, str]]] = field(default_factory=dict)
    complete: bool = True
    horizon: date = date.min  # days before it were forgotten

    def key(self, did: str) -> bytes | None:
        return self.keys.get(did)

    def suspended(self, did: str) -> bool:
        return did in self.suspended_dids

    def has_agents(self) -> bool:
        return bool(self.keys) or not self.complete

    def seen(self, actor: str, event_id: str, day: date) -> bool:
        found = self.ids.get(day)
        return found is not None and (actor, event_id) in found

    def remember(self, actor: str, event_id: str, day: date) -> None:
        if day not in self.ids:
            self.ids[day] = set()
        self.ids[day].add((actor, event_id))

    def merge_ids(self, other: AuthorityState) -> None:
        """Take ``other``'s ids as well (an append's scratch state, once it passed)."""
        for day, found in other.ids.items():
            self.ids.setdefault(day, set()).update(found)

    def forget_stale(self, ledger_now: datetime) -> None:
        """Forget the ids of days before ``single_use_horizon(ledger_now)``: a body of
        those days is stale from ``ledger_now`` on (rule 2), so none can be a replay
        still to catch — provided the ledger's clock never runs back (a verifier
        checks that first)."""
        horizon = single_use_horizon(ledger_now)
        if horizon <= self.horizon:
            return
        self.horizon = horizon
        for day in [d for d in self.ids if d < horizon]:
            del self.ids[day]

    def advance(self, event: AnyEvent) -> None:
        """Fold an accepted event into the state."""
        day = single_use_day(event)
        if event.event_id is not None and day is not None:
            self.remember(event.actor, event.event_id, day)
        match event:
            case AgentRegistered() | AgentKeyRotated():
                self.keys[event.did] = VerifyKey.from_recorded_pem(event.public_key).raw
            case AgentSuspended():
                self.suspended_dids.add(event.did)
            case AgentReinstated():
                self.suspended_dids.discard(event.did)
            case LedgerKeyRotated():
                self.ledger_did = event.did


def _type(event: AnyEvent) -> str:
    tag = type(event).__struct_config__.tag
    return str(tag)


def _minutes(delta: timedelta) -> int:
    return int(delta.total_seconds() // 60)
