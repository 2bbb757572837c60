"""The projector's PostgreSQL session: leadership and wake-ups (an adapter).

Replicas compete for a session advisory lock on a direct connection (not through a
transaction pooler); the holder projects (``Projector.project``), woken by LISTEN
on the same session, until the session dies or ``stop`` is set. ``append_wakeups``
is the LISTEN alone, for the projector inside an API process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable

import asyncpg

from ledger.errors import StoreUnavailableError
from ledger.postgres.dsn import connect_kwargs, pooler_of
from ledger.postgres.reader import NOTIFY_CHANNEL
from projections.projector import Projector, Wakeup, wait_any

__all__ = ["LEADER_LOCK", "append_wakeups", "project_while_leader"]

log = logging.getLogger("agentmesh.projector")

# Session advisory lock key of the projector leader ("AMPROJ" in ASCII).
LEADER_LOCK = 0x414D50524F4A


async def project_while_leader(
    projector: Projector, database_url: str, stop: asyncio.Event, retry_interval: float = 1.0
) -> None:
    """Compete for leadership; project while leader; stand by otherwise.

    ``database_url`` must reach PostgreSQL directly (not through a transaction
    pooler): the leader lock is a session advisory lock, and the wake-ups are a
    LISTEN on that same session. The ledger and the store may be read and
    written through a pooler."""
    if pooler_of(database_url) == "transaction":
        raise ValueError(
            "the projector's leader lock and LISTEN need a direct session: give it "
            "a URL without pooler=transaction (AGENTMESH_DATABASE_DIRECT_URL)"
        )
    while not stop.is_set():
        try:
            conn = await asyncpg.connect(**connect_kwargs(database_url))
        except (asyncpg.PostgresError, OSError) as exc:
            log.warning("database_unreachable", extra={"error": str(exc)})
            await wait_any(stop, asyncio.Event(), retry_interval)
            continue
        try:
            wake = Wakeup()
            try:
                leader = await conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK)
                if leader:
                    await conn.add_listener(NOTIFY_CHANNEL, _waker(wake))
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                log.warning("leader_lock_failed", extra={"error": str(exc)})
                leader = False
            if leader:
                log.info("projector_leader")
                projector.set_leader(True)
                await projector.project(stop, functools.partial(_alive, conn), wake)
            else:
                await wait_any(stop, asyncio.Event(), retry_interval)
        finally:
            projector.set_leader(False)
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                await conn.close()


@contextlib.asynccontextmanager
async def append_wakeups(database_url: str | None) -> AsyncIterator[asyncio.Event]:
    """An event set whenever an append commits: LISTEN on a session of its own on
    ``database_url`` (a direct URL). With None, an event nobody sets: the reader
    then relies on its poll alone (what a transaction pooler leaves)."""
    wake = Wakeup()
    if database_url is None:
        yield wake
        return
    if pooler_of(database_url) == "transaction":
        raise ValueError("LISTEN needs a direct URL, not one with pooler=transaction")
    try:
        conn = await asyncpg.connect(**connect_kwargs(database_url))
        await conn.add_listener(NOTIFY_CHANNEL, _waker(wake))
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise StoreUnavailableError(f"cannot listen for appends: {exc}") from exc
    try:
        yield wake
    finally:
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await conn.close()


def _waker(wake: Wakeup) -> Callable[..., None]:
    """A LISTEN callback that sets ``wake`` with the head the commit left (the payload)."""

    def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        wake.notify(payload)

    return on_notify


async def _alive(conn: asyncpg.Connection) -> bool:
    """Whether the session holding the leader lock still exists."""
    try:
        await asyncio.wait_for(conn.fetchval("SELECT 1"), 5)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
        return False
    return True
