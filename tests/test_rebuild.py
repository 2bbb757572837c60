"""The rebuild's fast paths give what the reference fold gives, byte for byte.

``state_at_position`` reads batches ahead and folds them with the lean decoder
(``projections.bodies``); the rebuild writes every document in one pass; the
registry listing decodes only what it shows. Each is held here against the
straightforward path it replaces: ``fold_recorded`` over ``iter_entries``
with ``decode_body``, ``agent_document`` per agent, and the whole document
decoded.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

import projections.start as start
from ledger.chain import RecordedEvent
from ledger.errors import StoreUnavailableError
from ledger.events import (
    AgentRegistered,
    AgentSuspended,
    HandshakeCompleted,
    PolicyViolation,
    decode_body,
)
from ledger.postgres import PostgresEventStore
from ledger.timefmt import format_time
from projections.config import TrustConfig
from projections.documents import agent_document, decode, encode, grant_document
from projections.projector import Projector
from projections.readstore import ProjectionReader, ProjectionStore
from projections.start import state_at_position
from projections.state import MeshState, fold
from tests.support import ManualClock, random_history

CONFIG = TrustConfig()
LEDGER = f"did:mesh:{'f' * 32}"
PEERS = [f"did:mesh:{n:032x}" for n in (7, 3, 9, 1, 8, 2)]


def reference(records: list[RecordedEvent], upto: int | None = None) -> MeshState:
    """The fold with every body decoded in full (``decode_body``), one event at a time."""
    return fold(
        (decode_body(r.body), r.position, r.recorded_at)
        for r in records
        if upto is None or r.position <= upto
    )


async def test_prefetched_fold_equals_the_reference_at_every_cut(
    ledger: PostgresEventStore, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small batches and slices: many prefetches, cuts inside and at the edge of one.
    monkeypatch.setattr(start, "BATCH", 7)
    monkeypatch.setattr(start, "_SLICE", 3)
    await random_history(ledger, clock, seed=11)
    records = [r async for r in ledger.iter_entries()]
    head = records[-1].position
    reached: list[int] = []
    whole = await state_at_position(ledger, CONFIG, progress=reached.append)
    assert whole.snapshot() == reference(records).snapshot()
    assert reached == list(range(7, head + 1, 7))
    for cut in (0, 1, 6, 7, 8, 14, head - 1, head, head + 5):
        state = await state_at_position(ledger, CONFIG, cut)
        assert state.snapshot() == reference(records, cut).snapshot(), cut


class FailingLedger:
    """A ledger whose third read fails (a connection lost mid-rebuild)."""

    def __init__(self, inner: PostgresEventStore) -> None:
        self.inner = inner
        self.reads = 0

    async def retention_window(self) -> None:
        return None

    async def read(self, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        self.reads += 1
        if self.reads == 3:
            raise StoreUnavailableError("connection lost")
        return await self.inner.read(after, limit)


async def test_a_failed_read_fails_the_fold_and_leaves_no_read_behind(
    ledger: PostgresEventStore, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(start, "BATCH", 5)
    await random_history(ledger, clock, seed=12, steps=40)
    failing = FailingLedger(ledger)
    with pytest.raises(StoreUnavailableError):
        await state_at_position(failing, CONFIG)  # type: ignore[arg-type]
    assert failing.reads == 3
    await asyncio.sleep(0)
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not [t for t in others if "read" in repr(t.get_coro())]


async def test_rebuilt_documents_equal_the_reference_documents(
    ledger: PostgresEventStore, read_store: ProjectionStore, clock: ManualClock
) -> None:
    agents = await random_history(ledger, clock, seed=13)
    await ledger.append_own(
        AgentSuspended(
            actor=ledger.ledger_did,
            occurred_at=format_time(clock.now),
            did=agents[0].did,
            reason="held for review",
        )
    )
    await Projector(ledger, read_store, CONFIG).rebuild()
    state = reference([r async for r in ledger.iter_entries()])
    dids, grants = sorted(state.agents), sorted(state.delegations.grants)
    assert await read_store.agent_docs(dids) == [to_dict_document(state, d) for d in dids]
    assert await read_store.grant_docs(grants) == [grant_document(state, g) for g in grants]


def to_dict_document(state: MeshState, did: str) -> bytes:
    """An agent document as the ``to_dict`` forms give it, keys sorted by the encoder."""
    return encode(
        {
            "grants_in": list(state.delegations.by_delegatee.get(did, ())),
            "registry": state.agents[did].to_dict(),
            "trust": state.trust[did].to_dict(),
        }
    )


def test_agent_documents_are_the_to_dict_forms_with_sorted_keys() -> None:
    at = datetime(2026, 3, 1, tzinfo=UTC)
    state = MeshState()
    state.apply(
        AgentRegistered(
            actor=LEDGER,
            occurred_at=format_time(at),
            did=PEERS[0],
            public_key="PEM",
            capabilities=("tools:*", "http:get"),
            metadata={"zone": "eu", "Team": "søk", "app": "x", "ÿ": "last"},
        ),
        1,
        at,
    )
    for n, peer in enumerate(PEERS[1:], start=2):
        state.apply(AgentRegistered(actor=LEDGER, occurred_at="x", did=peer, public_key="P"), n, at)
    for n, peer in enumerate(reversed(PEERS[1:]), start=len(PEERS) + 1):
        report = PolicyViolation(
            actor=peer, occurred_at="x", agent=PEERS[0], severity="low", rule="r"
        )
        state.apply(report, 2 * n, at + timedelta(seconds=n))
        shake = HandshakeCompleted(
            actor=LEDGER, occurred_at="x", handshake_id="h", initiator=peer, responder=PEERS[0]
        )
        state.apply(shake, 2 * n + 1, at + timedelta(seconds=n))
    assert len(state.trust[PEERS[0]].peers) == len(state.trust[PEERS[0]].partners) == 5
    for did in PEERS:
        assert agent_document(state, did) == to_dict_document(state, did)


async def test_listing_shows_what_the_whole_document_says(
    ledger: PostgresEventStore, read_store: ProjectionStore, clock: ManualClock
) -> None:
    agents = await random_history(ledger, clock, seed=14)
    await ledger.append_own(
        AgentSuspended(
            actor=ledger.ledger_did,
            occurred_at=format_time(clock.now),
            did=agents[1].did,
            reason="held for review",
        )
    )
    await Projector(ledger, read_store, CONFIG).rebuild()
    reader = ProjectionReader(read_store, CONFIG)
    for hours in (0.0, 30.0, 900.0):
        now = clock.now + timedelta(hours=hours)
        listed, cursor = [], None
        while True:
            page = await reader.agents(now, after=cursor, limit=4)
            listed += page.agents
            if (cursor := page.next_cursor) is None:
                break
        assert [s.record.did for s in listed] == sorted(a.did for a in agents)
        for summary in listed:
            (raw,) = await read_store.agent_docs([summary.record.did])
            assert raw is not None
            assert summary.record == await reader.agent(summary.record.did)
            assert summary.trust == await reader.trust(summary.record.did, now)
            assert summary.record.status == decode(raw)["registry"]["status"]
        assert any(s.record.status == "suspended" for s in listed)
