"""`agentmesh retention run`: the ledger's retention with the projections' snapshot."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from agentmesh.settings import Settings
from agentmesh.wiring import trust_config
from ledger.postgres import PostgresEventStore
from ledger.retention import apply_retention, plan_retention, retention_window
from ledger.timefmt import utc_now
from projections.state import MeshState


async def run_retention(
    settings: Settings, *, dry_run: bool, clock: Callable[[], datetime] = utc_now
) -> str:
    key = settings.signing_key()
    store = await PostgresEventStore.open(settings.require_database_url(), key, clock=clock)
    config = trust_config(settings)

    async def snapshot_at(position: int) -> Mapping[str, Any]:
        """Every projection's state at ``position``: the previous snapshot plus the
        events after it, folded with the same pure fold as the projector."""
        window = await retention_window(store)
        state = (
            MeshState(config)
            if window is None
            else MeshState.from_snapshot(window.snapshot, config)
        )
        async for record in store.iter_entries(after=state.position, batch=10_000):
            if record.position > position:
                break
            state.apply_recorded(record)
        return state.snapshot()

    try:
        now = clock()
        plan = await plan_retention(
            store, key.public, now, settings.governance_audit_retention_days
        )
        if dry_run:
            return "dry run: " + plan.summary()
        return await apply_retention(store, key, plan, snapshot_at, now)
    finally:
        await store.close()
