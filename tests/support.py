"""Helpers shared by tests: agents, signed events, a controllable clock."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ledger.events import AgentRegistered, PolicyViolation, TrustSignal
from ledger.identity import SigningKey
from ledger.ports import Ledger
from ledger.signed import SignedEvent
from ledger.timefmt import format_time

# Signed bodies must be fresh (``ledger.authority.MAX_AGE``): tests start now.
T0 = datetime.now(UTC).replace(microsecond=0)


@dataclass
class ManualClock:
    """An injectable clock that only moves when told to."""

    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


@dataclass
class Agent:
    key: SigningKey = field(default_factory=SigningKey.generate)
    capabilities: tuple[str, ...] = ()

    @property
    def did(self) -> str:
        return self.key.did

    def violation(
        self,
        subject: str | None = None,
        severity: str = "medium",
        rule: str = "tool-deny",
        detail: str = "",
        at: datetime | None = None,
    ) -> SignedEvent:
        event = PolicyViolation(
            actor=self.did,
            occurred_at=format_time(at or T0),
            agent=subject or self.did,
            severity=severity,  # type: ignore[arg-type]
            rule=rule,
            detail=detail,
        )
        return SignedEvent.create(event, self.key)

    def signal(self, subject: str, signal: str = "good", at: datetime | None = None) -> SignedEvent:
        """A signal about another agent (one about oneself is refused)."""
        event = TrustSignal(
            actor=self.did, occurred_at=format_time(at or T0), agent=subject, signal=signal
        )
        return SignedEvent.create(event, self.key)


async def register(
    store: Ledger,
    agent: Agent | None = None,
    capabilities: tuple[str, ...] = (),
    at: datetime | None = None,
) -> Agent:
    agent = agent or Agent(capabilities=capabilities)
    await store.append_own(
        AgentRegistered(
            actor=store.ledger_did,
            occurred_at=format_time(at or T0),
            did=agent.did,
            public_key=agent.key.public.pem(),
            capabilities=capabilities,
        )
    )
    return agent


async def random_history(
    store: Ledger,
    clock: ManualClock,
    seed: int,
    steps: int = 120,
    agents: list[Agent] | None = None,
) -> list[Agent]:
    """A varied ledger: registrations, reports, handshakes, grants, revocations,
    suspensions, across hours of (injected) time. Deterministic per ``seed``.
    Suspended agents write nothing (the ledger would refuse it); the history ends
    with every agent reinstated, so callers can go on writing as any of them."""
    import random

    from ledger.events import (
        AgentReinstated,
        AgentSuspended,
        DelegationGranted,
        DelegationRevoked,
        HandshakeCompleted,
        HandshakeFailed,
    )

    rng = random.Random(seed)
    agents = agents if agents is not None else []
    grants: list[tuple[str, Agent, Agent, tuple[str, ...], str | None]] = []
    caps = ("tools:*", "tools:search", "tools:write", "http:get", "mcp:*")
    suspended: set[str] = set()
    while len(agents) < 4:
        agents.append(await register(store, capabilities=tuple(rng.sample(caps, 3)), at=clock.now))
    for step in range(steps):
        clock.advance(minutes=rng.randint(1, 240))
        now = format_time(clock.now)
        roll = rng.random()
        a, b = rng.sample(agents, 2)
        if a.did in suspended and 0.08 <= roll < 0.88:
            continue
        if roll < 0.08:
            agents.append(
                await register(store, capabilities=tuple(rng.sample(caps, 2)), at=clock.now)
            )
        elif roll < 0.35:
            severity = rng.choice(["low", "medium", "high", "critical"])
            await store.append([a.violation(subject=b.did, severity=severity, at=clock.now)])
        elif roll < 0.5:
            await store.append([a.signal(subject=b.did, at=clock.now)])
        elif roll < 0.6:
            await store.append_own(
                HandshakeCompleted(
                    actor=store.ledger_did,
                    occurred_at=now,
                    handshake_id=f"hs-{seed}-{step}",
                    initiator=a.did,
                    responder=b.did,
                )
            )
        elif roll < 0.66:
            await store.append_own(
                HandshakeFailed(
                    actor=store.ledger_did,
                    occurred_at=now,
                    handshake_id=f"hs-{seed}-{step}",
                    initiator=a.did,
                    responder=b.did,
                    reason=rng.choice(["bad_signature", "expired", "score_too_low"]),
                )
            )
        elif roll < 0.82:
            parent = rng.choice(grants) if grants and rng.random() < 0.5 else None
            delegator = parent[2] if parent else a
            delegatee = b if b is not delegator else a
            pool = parent[3] if parent else delegator.capabilities
            if not pool or delegator.did in suspended:
                continue
            chosen = tuple(rng.sample(pool, min(len(pool), rng.randint(1, 2))))
            if rng.random() < 0.2 and chosen[0] == "tools:*":
                chosen = ("tools:search",)  # narrowing a wildcard
            grant_id = f"g-{seed}-{step:04d}"
            expires = parent[4] if parent else None
            if expires is None and rng.random() < 0.3:
                expires = format_time(clock.now + timedelta(hours=rng.randint(1, 48)))
            event = DelegationGranted(
                actor=delegator.did,
                occurred_at=now,
                grant_id=grant_id,
                delegator=delegator.did,
                delegatee=delegatee.did,
                capabilities=chosen,
                expires_at=expires,
                parent=parent[0] if parent else None,
            )
            await store.append([SignedEvent.create(event, delegator.key)])
            grants.append((grant_id, delegator, delegatee, chosen, expires))
        elif roll < 0.88 and grants:
            grant_id, delegator, _, _, _ = rng.choice(grants)
            if delegator.did in suspended:
                continue
            revocation = DelegationRevoked(
                actor=delegator.did, occurred_at=now, grant_id=grant_id, reason="test"
            )
            await store.append([SignedEvent.create(revocation, delegator.key)])
        elif roll < 0.94:
            await store.append_own(
                AgentSuspended(actor=store.ledger_did, occurred_at=now, did=a.did, reason="test")
            )
            suspended.add(a.did)
        else:
            await store.append_own(
                AgentReinstated(actor=store.ledger_did, occurred_at=now, did=a.did, reason="test")
            )
            suspended.discard(a.did)
    for agent in agents:
        if agent.did in suspended:
            await store.append_own(
                AgentReinstated(
                    actor=store.ledger_did,
                    occurred_at=format_time(clock.now),
                    did=agent.did,
                    reason="end of history",
                )
            )
    return agents


# Ed25519 public keys nobody should hold: the eight points of small order (the
# curve's torsion), canonically encoded, and two non-canonical encodings of the
# identity. Under a cofactorless check without a small-order rule (OpenSSL's) the
# identity key verifies FORGERY for every message.
SMALL_ORDER = [
    bytes.fromhex(h)
    for h in (
        "0100000000000000000000000000000000000000000000000000000000000000",  # identity
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
        "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
        "0000000000000000000000000000000000000000000000000000000000000080",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
        "0100000000000000000000000000000000000000000000000000000000000080",  # -0: identity
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p+1: identity
    )
]
IDENTITY = SMALL_ORDER[0]
# R = the identity, S = 0: [S]B == R + [k]A for A of small order whatever k is.
FORGERY = IDENTITY + bytes(32)
_ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")  # DER prefix of an Ed25519 public key


def pem_of(raw: bytes) -> str:
    body = base64.b64encode(_ED25519_SPKI + raw).decode()
    return f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n"
