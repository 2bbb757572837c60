"""Helpers shared by tests: agents, signed events, a controllable clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ledger.events import AgentRegistered, PolicyViolation, TrustSignal
from ledger.identity import SigningKey
from ledger.signed import SignedEvent
from ledger.store import PostgresEventStore
from ledger.timefmt import format_time

T0 = datetime(2026, 1, 1, tzinfo=UTC)


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
    ) -> SignedEvent:
        event = PolicyViolation(
            actor=self.did,
            occurred_at=format_time(T0),
            agent=subject or self.did,
            severity=severity,  # type: ignore[arg-type]
            rule=rule,
            detail=detail,
        )
        return SignedEvent.create(event, self.key)

    def signal(self, subject: str | None = None, signal: str = "good") -> SignedEvent:
        event = TrustSignal(
            actor=self.did, occurred_at=format_time(T0), agent=subject or self.did, signal=signal
        )
        return SignedEvent.create(event, self.key)


async def register(
    store: PostgresEventStore, agent: Agent | None = None, capabilities: tuple[str, ...] = ()
) -> Agent:
    agent = agent or Agent(capabilities=capabilities)
    await store.append_own(
        AgentRegistered(
            actor=store.ledger_did,
            occurred_at=format_time(T0),
            did=agent.did,
            public_key=agent.key.public.pem(),
            capabilities=capabilities,
        )
    )
    return agent


async def random_history(
    store: PostgresEventStore,
    clock: ManualClock,
    seed: int,
    steps: int = 120,
    agents: list[Agent] | None = None,
) -> list[Agent]:
    """A varied ledger: registrations, reports, handshakes, grants, revocations,
    suspensions, across hours of (injected) time. Deterministic per ``seed``."""
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
    while len(agents) < 4:
        agents.append(await register(store, capabilities=tuple(rng.sample(caps, 3))))
    for step in range(steps):
        clock.advance(minutes=rng.randint(1, 240))
        now = format_time(clock.now)
        roll = rng.random()
        a, b = rng.sample(agents, 2)
        if roll < 0.08:
            agents.append(await register(store, capabilities=tuple(rng.sample(caps, 2))))
        elif roll < 0.35:
            await store.append(
                [
                    a.violation(
                        subject=b.did, severity=rng.choice(["low", "medium", "high", "critical"])
                    )
                ]
            )
        elif roll < 0.5:
            await store.append([a.signal(subject=b.did)])
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
            if not pool:
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
            revocation = DelegationRevoked(
                actor=delegator.did, occurred_at=now, grant_id=grant_id, reason="test"
            )
            await store.append([SignedEvent.create(revocation, delegator.key)])
        elif roll < 0.94:
            await store.append_own(
                AgentSuspended(actor=store.ledger_did, occurred_at=now, did=a.did, reason="test")
            )
        else:
            await store.append_own(
                AgentReinstated(actor=store.ledger_did, occurred_at=now, did=a.did, reason="test")
            )
    return agents
