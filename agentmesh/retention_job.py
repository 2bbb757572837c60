"""`agentmesh retention run`: the ledger's retention with the projections' snapshot."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from agentmesh.settings import Settings
from agentmesh.wiring import trust_config
from ledger.postgres import PostgresEventStore
from ledger.retention import apply_retention, plan_retention
from ledger.timefmt import utc_now
from projections.start import state_at_position


async def run_retention(
    settings: Settings, *, dry_run: bool, clock: Callable[[], datetime] = utc_now
) -> str:
    key = settings.signing_key()
    store = await PostgresEventStore.open(settings.require_database_url(), key, clock=clock)
    config = trust_config(settings)

    async def snapshot_at(position: int) -> Mapping[str, Any]:
        """Every projection's state at ``position``, folded as the projector folds it."""
        return (await state_at_position(store, config, position)).snapshot()

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
