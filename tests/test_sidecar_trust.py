"""The sidecar's trust cache never serves a value older than a change it was told of."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

from projections.documents import Change
from projections.readstore import SUBSCRIBED
from sidecar.trust import TrustSource


class SlowReader:
    """A reader whose answers can be held back, to interleave a read and a change."""

    def __init__(self) -> None:
        self.score = 800
        self.gate: asyncio.Event | None = None

    async def standing(self, did: str, now: datetime) -> Any:
        score = self.score  # the value as of when the read started
        if self.gate is not None:
            await self.gate.wait()
        return SimpleNamespace(
            view=SimpleNamespace(score=score, tier="trusted"),
            record=SimpleNamespace(status="active"),
            capabilities=(),
        )


async def test_a_change_during_a_read_is_not_lost() -> None:
    reader = SlowReader()
    source = TrustSource(reader, "did:mesh:x", lambda: datetime.now(UTC))  # type: ignore[arg-type]
    await source.refresh()
    reader.gate = asyncio.Event()
    source.invalidate()  # a periodic refresh starts reading the old score...
    first = asyncio.create_task(source.refresh())
    await asyncio.sleep(0)
    reader.score = 790  # ...the projector writes a new one and publishes the change...
    source.invalidate(Change(2, frozenset({"did:mesh:x"})))
    second = asyncio.create_task(source.refresh())
    await asyncio.sleep(0)
    reader.gate.set()  # ...and the old read answers last.
    await asyncio.gather(first, second)
    reader.gate = None
    current = await source.current()
    assert current is not None
    assert current.score == 790


class _BrokenOnceChanges:
    """A store whose first subscription fails with an unexpected error."""

    def __init__(self) -> None:
        self.subscriptions = 0
        self.store = self

    async def changes(self) -> AsyncGenerator[Change, None]:
        self.subscriptions += 1
        if self.subscriptions == 1:
            raise RuntimeError("a bug in a subscription")
        yield SUBSCRIBED
        await asyncio.Event().wait()


async def test_an_unexpected_error_does_not_end_the_sidecars_watch() -> None:
    """Invalidation that stopped for good would leave decisions on the periodic re-read
    alone: the watch marks its value stale and subscribes again, whatever the error."""
    reader = SlowReader()
    broken = _BrokenOnceChanges()
    reader.store = broken  # type: ignore[attr-defined]
    source = TrustSource(reader, "did:mesh:x", lambda: datetime.now(UTC))  # type: ignore[arg-type]
    watch = asyncio.create_task(source.watch())
    try:
        for _ in range(200):  # until subscribed again
            if broken.subscriptions == 2:
                break
            await asyncio.sleep(0.05)
        assert broken.subscriptions == 2
        assert not watch.done()
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)


POLICY = """\
version: 1
staleness_seconds: 1
rules:
  - id: search
    tools: ["search"]
    effect: allow
    min_score: 700
  - id: limited
    tools: ["limited"]
    effect: allow
    rate_limit: {requests: 2, per_seconds: 60}
"""


async def test_a_cached_decision_never_outlives_its_trust_read(tmp_path: Path) -> None:
    """Tool decisions are cached per (policy, trust read): a change, a stale read and a
    rate-limited rule are each decided again."""
    from prometheus_client import CollectorRegistry

    from ledger.identity import SigningKey
    from sidecar.outbox import Outbox
    from sidecar.policy import Action, PolicyWatcher
    from sidecar.service import Sidecar

    reader = SlowReader()
    now = [1000.0]
    key = SigningKey.generate()
    trust = TrustSource(
        reader,  # type: ignore[arg-type]
        key.did,
        lambda: datetime.now(UTC),
        refresh_seconds=5,
        monotonic=lambda: now[0],
    )
    await trust.refresh()
    (tmp_path / "policy.yaml").write_text(POLICY)
    outbox = Outbox.open(tmp_path / "outbox", "http://127.0.0.1:9", key)
    sidecar = Sidecar(
        key=key,
        trust=trust,
        policy=PolicyWatcher(tmp_path / "policy.yaml", "strict", False),
        outbox=outbox,
        upstreams={},
        api=httpx.AsyncClient(),
        registry=CollectorRegistry(),
        clock=lambda: datetime.now(UTC),
        handshake_ttl=300,
        health_file=None,
    )
    try:
        search = Action("tool", "search")
        assert (await sidecar.decide(search)).allowed
        assert (await sidecar.decide(search)).allowed  # from the cache
        reader.score = 650  # a violation, projected: the change invalidates the cache
        trust.invalidate()
        decision = await sidecar.decide(search)
        assert not decision.allowed
        assert decision.reason == "below_min_score"
        reader.score = 800
        trust.invalidate()
        assert (await sidecar.decide(search)).allowed
        now[0] += 2  # older than staleness_seconds, not yet re-read: strict denies
        decision = await sidecar.decide(search)
        assert not decision.allowed
        assert decision.reason == "trust_stale"
        now[0] -= 2
        limited = Action("tool", "limited")
        found = [(await sidecar.decide(limited)).allowed for _ in range(3)]
        assert found == [True, True, False]  # the limiter sees every call
    finally:
        await outbox.aclose()
        await sidecar.close()
