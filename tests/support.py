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
    agent = agent or Agent()
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
