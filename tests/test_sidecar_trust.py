"""The sidecar's trust cache never serves a value older than a change it was told of."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from projections.documents import Change
from sidecar.trust import TrustSource


class SlowReader:
    """A reader whose answers can be held back, to interleave a read and a change."""

    def __init__(self) -> None:
        self.score = 800
        self.gate: asyncio.Event | None = None

    async def trust(self, did: str, now: datetime) -> Any:
        score = self.score  # the value as of when the read started
        if self.gate is not None:
            await self.gate.wait()
        return SimpleNamespace(score=score, tier="trusted")

    async def agent(self, did: str) -> Any:
        return SimpleNamespace(status="active")

    async def capabilities(self, did: str, now: datetime) -> tuple[str, ...]:
        return ()


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
