"""``PostgresProjectionStore``: projections in tables beside the ledger.

``projection_current`` names the live generation (one row per store name, so
tests and several deployments can share a database); ``projection_docs``
holds agent ('a') and grant ('g') documents per generation;
``projection_meta`` the position. A write is one transaction that first
moves the position with ``UPDATE … WHERE position = expected`` (the
compare-and-set that makes the projector exactly-once) and then upserts the
documents. Change notifications go out with ``NOTIFY`` after the commit, so a
subscriber that re-reads on a notification sees what it announces.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import asyncpg

from ledger.postgres.dsn import connect_kwargs, pooler_of
from projections.documents import Batch, Change, Meta, decode, encode
from projections.readstore import (
    HEARTBEAT,
    SUBSCRIBED,
    Closure,
    ReadStoreError,
    StaleWriteError,
    read_change,
)

_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)
CHANNEL = "agentmesh_projection"
# NOTIFY payloads are limited to 8000 bytes: beyond this, say "everything changed".
_MAX_NOTIFY_AGENTS = 150


# An agent's closure (``ProjectionStore.agent_closure``): its document ('a'), the grants
# to it and their ancestors ('g'; a grant's chain holds every ancestor), the documents of
# those grants' delegators other than the agent ('d'). The projector writes an agent's
# document with sorted keys, so it starts with its ``grants_in`` (grant ids hold no
# ']'): that head alone is parsed, not the peer windows that are most of a busy agent's
# document (a 134 kB document took 3.8 ms to parse whole); another document is parsed
# whole.
_CLOSURE = """
WITH a AS (
  SELECT doc,
         CASE WHEN substring(doc FROM 1 FOR 14) = '{"grants_in":['::bytea
              THEN (convert_from(substring(doc FROM 1 FOR position('\\x5d'::bytea IN doc)),
                                 'UTF8') || '}')::jsonb
              ELSE convert_from(doc, 'UTF8')::jsonb END AS head
    FROM projection_docs
   WHERE generation = projection_generation($1) AND kind = 'a' AND id = $2
), direct AS (
  SELECT d.id, d.doc, convert_from(d.doc, 'UTF8')::jsonb AS j FROM projection_docs d
   WHERE d.generation = projection_generation($1) AND d.kind = 'g'
     AND d.id IN (SELECT jsonb_array_elements_text(head -> 'grants_in') FROM a)
), inherited AS (
  SELECT d.id, d.doc, convert_from(d.doc, 'UTF8')::jsonb AS j FROM projection_docs d
   WHERE d.generation = projection_generation($1) AND d.kind = 'g'
     AND d.id IN (SELECT jsonb_array_elements_text(direct.j -> 'chain') FROM direct)
     AND d.id NOT IN (SELECT id FROM direct)
), grants AS (
  SELECT id, doc, j FROM direct UNION ALL SELECT id, doc, j FROM inherited
)
SELECT 'a' AS part, $2::text AS id, doc FROM a
UNION ALL
SELECT 'g', id, doc FROM grants
UNION ALL
SELECT 'd', d.id, d.doc FROM projection_docs d
 WHERE d.generation = projection_generation($1) AND d.kind = 'a' AND d.id <> $2
   AND d.id IN (SELECT j ->> 'delegator' FROM grants)
"""


class PostgresProjectionStore:
    name = "postgres"

    def __init__(
        self, pool: asyncpg.Pool, store_name: str = "default", *, listen_url: str | None = None
    ) -> None:
        self._pool = pool
        self._name = store_name
        self._listen_url = listen_url
        self.heartbeat = HEARTBEAT

    @classmethod
    async def connect(
        cls, url: str, store_name: str = "default", *, listen_url: str | None = None
    ) -> PostgresProjectionStore:
        """A store on ``url``. Change notifications (``changes``) LISTEN on a session of
        their own: on ``listen_url`` when given, else on ``url`` unless it goes through a
        transaction pooler, where LISTEN cannot work (``changes`` then says so)."""
        if listen_url is not None and pooler_of(listen_url) == "transaction":
            raise ValueError("LISTEN needs a direct URL, not one with pooler=transaction")
        if listen_url is None and pooler_of(url) == "none":
            listen_url = url
        try:
            pool = await asyncpg.create_pool(**connect_kwargs(url), min_size=1, max_size=4)
        except _DRIVER_ERRORS as exc:
            raise ReadStoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        return cls(pool, store_name, listen_url=listen_url)

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        try:
            return list(await self._pool.fetch(query, self._name, *args))
        except _DRIVER_ERRORS as exc:
            raise ReadStoreError(f"postgres read store: {exc}") from exc

    async def meta(self) -> Meta | None:
        rows = await self._fetch(
            "SELECT meta FROM projection_meta WHERE generation = projection_generation($1)"
        )
        return None if not rows else Meta.from_dict(decode(bytes(rows[0]["meta"])))

    async def _docs(self, kind: str, ids: Sequence[str]) -> list[bytes | None]:
        if not ids:
            return []
        rows = await self._fetch(
            "SELECT id, doc FROM projection_docs WHERE generation = projection_generation($1) "
            "AND kind = $2 AND id = ANY($3::text[])",
            kind,
            list(ids),
        )
        found = {r["id"]: bytes(r["doc"]) for r in rows}
        return [found.get(i) for i in ids]

    async def agent_docs(self, dids: Sequence[str]) -> list[bytes | None]:
        return await self._docs("a", dids)

    async def grant_docs(self, grant_ids: Sequence[str]) -> list[bytes | None]:
        return await self._docs("g", grant_ids)

    async def agent_closure(self, did: str) -> Closure | None:
        # One statement: one snapshot of the store, one round trip.
        rows = await self._fetch(_CLOSURE, did)
        agent = next((bytes(r["doc"]) for r in rows if r["part"] == "a"), None)
        if agent is None:
            return None
        closure = Closure(agent)
        for row in rows:
            if row["part"] == "g":
                closure.grants[row["id"]] = bytes(row["doc"])
            elif row["part"] == "d":
                closure.delegators[row["id"]] = bytes(row["doc"])
        return closure

    async def agent_page(self, after: str | None, limit: int) -> list[tuple[str, bytes]]:
        rows = await self._fetch(
            "SELECT id, doc FROM projection_docs WHERE generation = projection_generation($1) "
            "AND kind = 'a' AND id > $2 ORDER BY id LIMIT $3",
            after or "",
            limit,
        )
        return [(r["id"], bytes(r["doc"])) for r in rows]

    async def _scan(self, kind: str) -> AsyncIterator[bytes]:
        after = ""
        while True:
            rows = await self._fetch(
                "SELECT id, doc FROM projection_docs WHERE generation = projection_generation($1) "
                "AND kind = $2 AND id > $3 ORDER BY id LIMIT 1000",
                kind,
                after,
            )
            for row in rows:
                yield bytes(row["doc"])
            if len(rows) < 1000:
                return
            after = rows[-1]["id"]

    def all_agent_docs(self) -> AsyncIterator[bytes]:
        return self._scan("a")

    def all_grant_docs(self) -> AsyncIterator[bytes]:
        return self._scan("g")

    async def commit(
        self, batch: Batch, expected: tuple[str, int], change: Change | None = None
    ) -> None:
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                moved = await conn.fetchval(
                    "UPDATE projection_meta SET position = $3, meta = $4 "
                    "WHERE generation = $2 AND generation = projection_generation($1) "
                    "AND position = $5 RETURNING 1",
                    self._name,
                    expected[0],
                    batch.meta.position,
                    encode(batch.meta.to_dict()),
                    expected[1],
                )
                if moved is None:
                    raise StaleWriteError(f"postgres read store is not at {expected}")
                await self._upsert(conn, expected[0], batch)
                if change is not None:
                    # Delivered when the transaction commits, and only then.
                    await conn.execute("SELECT pg_notify($1, $2)", *self._notification(change))
        except _DRIVER_ERRORS as exc:
            raise ReadStoreError(f"postgres read store: {exc}") from exc

    @staticmethod
    async def _upsert(conn: asyncpg.Connection, generation: str, batch: Batch) -> None:
        kinds = ["a"] * len(batch.agents) + ["g"] * len(batch.grants)
        ids = [*batch.agents, *batch.grants]
        docs = [*batch.agents.values(), *batch.grants.values()]
        await conn.execute(
            "INSERT INTO projection_docs (generation, kind, id, doc) "
            "SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bytea[]) "
            "ON CONFLICT (generation, kind, id) DO UPDATE SET doc = excluded.doc",
            generation,
            kinds,
            ids,
            docs,
        )

    async def replace_all(self, batch: Batch) -> None:
        generation = batch.meta.generation or uuid.uuid4().hex
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                # Readers keep seeing the old generation until this commits.
                await conn.execute(
                    "INSERT INTO projection_meta (generation, position, meta) VALUES ($1, $2, $3)",
                    generation,
                    batch.meta.position,
                    encode(batch.meta.to_dict()),
                )
                records = [("a", k, v) for k, v in batch.agents.items()]
                records += [("g", k, v) for k, v in batch.grants.items()]
                await conn.copy_records_to_table(
                    "projection_docs",
                    records=[(generation, *r) for r in records],
                    columns=["generation", "kind", "id", "doc"],
                )
                old = await conn.fetchval(
                    "SELECT generation FROM projection_current WHERE name = $1 FOR UPDATE",
                    self._name,
                )
                await conn.execute(
                    "INSERT INTO projection_current (name, generation) VALUES ($1, $2) "
                    "ON CONFLICT (name) DO UPDATE SET generation = excluded.generation",
                    self._name,
                    generation,
                )
                if old is not None and old != generation:
                    await conn.execute("DELETE FROM projection_docs WHERE generation = $1", old)
                    await conn.execute("DELETE FROM projection_meta WHERE generation = $1", old)
        except _DRIVER_ERRORS as exc:
            raise ReadStoreError(f"postgres read store: {exc}") from exc

    def _notification(self, change: Change) -> tuple[str, str]:
        """The channel and payload of ``change`` (too many agents for a payload: all)."""
        if change.agents is not None and len(change.agents) > _MAX_NOTIFY_AGENTS:
            change = Change(change.position, None)
        return f"{CHANNEL}_{self._name}", change.encode().decode()

    async def publish(self, change: Change) -> None:
        try:
            await self._pool.execute("SELECT pg_notify($1, $2)", *self._notification(change))
        except _DRIVER_ERRORS as exc:
            raise ReadStoreError(f"postgres read store: {exc}") from exc

    async def changes(self) -> AsyncGenerator[Change, None]:
        queue: asyncio.Queue[Change] = asyncio.Queue()

        def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            queue.put_nowait(read_change(payload))

        channel = f"{CHANNEL}_{self._name}"
        if self._listen_url is None:
            raise ReadStoreError(
                "postgres read store: change notifications need a direct session (LISTEN "
                "does not pass through a transaction pooler): set AGENTMESH_DATABASE_DIRECT_URL"
            )
        try:
            conn = await asyncpg.connect(**connect_kwargs(self._listen_url))
        except _DRIVER_ERRORS as exc:
            raise ReadStoreError(f"postgres read store: {exc}") from exc
        silent = False
        try:
            await conn.add_listener(channel, on_notify)  # LISTEN: in place once it returns
            yield SUBSCRIBED
            while True:
                try:
                    change = await asyncio.wait_for(queue.get(), self.heartbeat)
                except TimeoutError:
                    # A session that only listens would wait forever on a server gone
                    # without a reset, while every change passes it by: ask it.
                    try:
                        await asyncio.wait_for(conn.fetchval("SELECT 1"), self.heartbeat)
                    except TimeoutError:
                        silent = True
                        raise ReadStoreError(
                            "postgres read store: the change subscription went silent "
                            "(no answer to SELECT 1)"
                        ) from None
                    continue
                yield change
        except _DRIVER_ERRORS as exc:
            raise ReadStoreError(f"postgres read store: {exc}") from exc
        finally:
            # Said goodbye to within a heartbeat; a link gone silent (noticed or not
            # yet: a follower stopping) is cut, not waited on.
            try:
                if silent:
                    raise TimeoutError
                async with asyncio.timeout(self.heartbeat):
                    await conn.remove_listener(channel, on_notify)
                    await conn.close()
            except (TimeoutError, *_DRIVER_ERRORS):
                conn.terminate()

    async def clear_for_tests(self) -> None:
        await self._pool.execute("DELETE FROM projection_current WHERE name = $1", self._name)

    async def close(self) -> None:
        """Close the pool; connections that do not say goodbye within a heartbeat (a
        server gone silent) are cut, so a stopping process is not held up."""
        try:
            async with asyncio.timeout(self.heartbeat):
                await self._pool.close()
        except TimeoutError:
            self._pool.terminate()
