"""Single-use ids and idempotency keys in one partition per day, dropped whole.

``event_ids`` (one row per event) and ``idempotency_keys`` (one per keyed request:
every sidecar report) were single tables, so retention deleted their rows before
each cut one by one: 2.1 s and ~200 MB of WAL for one day of 1.8M events, growing
with the traffic. Both now carry ``day``, the UTC day their bodies occurred on
(``ledger.authority.single_use_day``: for a key, its request's first event), and
are partitioned by it (``<table>_pYYYYMMDD``, created by the writer as for
``events``). The primary keys become (key, day) and (signer, key, day): a replay or
a retry resends the same bodies, so it meets its original in the same partition.
A body that occurred before ``ledger.authority.single_use_horizon`` is stale (more
than ``MAX_AGE`` old), so those days' partitions are dropped whole, by
``agentmesh retention run``.

The upgrade carries over the rows of the days still inside the horizon (the day read
from each stored body's ``occurred_at``); older ones can only match stale bodies. The
downgrade puts every row back into single tables (a key seen on several days keeps
its first row).

Revision ID: 0008_single_use_days
Revises: 0007_write_path
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0008_single_use_days"
down_revision = "0007_write_path"
branch_labels = None
depends_on = None

# The day a stored body occurred on, and ``single_use_horizon`` of the ledger's clock
# (MAX_AGE = 7 days, plus a day): SQL of the same rules as ``ledger.authority``.
_DAY = (
    "(((convert_from(e.body, 'UTF8')::jsonb ->> 'occurred_at')::timestamptz) "
    "AT TIME ZONE 'UTC')::date"
)
_HORIZON = (
    "(SELECT ((recorded_at - interval '8 days') AT TIME ZONE 'UTC')::date "
    "FROM ledger_head WHERE id = 1)"
)
# Bodies of the horizon's days were recorded at most MAX_FUTURE_SKEW before them.
_RECENT = "e.recorded_at >= (SELECT recorded_at - interval '10 days' FROM ledger_head WHERE id = 1)"


def _partitions_for(table: str, days_query: str) -> None:
    op.execute(
        f"""
        DO $$
        DECLARE d date;
        BEGIN
          FOR d IN {days_query} LOOP
            EXECUTE format('CREATE TABLE %I PARTITION OF {table} FOR VALUES FROM (%L) TO (%L)',
                           '{table}_p' || to_char(d, 'YYYYMMDD'), d, d + 1);
          END LOOP;
        END $$
        """
    )


def upgrade() -> None:
    for table in ("event_ids", "idempotency_keys"):
        op.execute(f"DROP INDEX {table}_position_brin")
        op.execute(f"ALTER TABLE {table} RENAME TO {table}_0007")
        op.execute(f"ALTER INDEX {table}_pkey RENAME TO {table}_0007_pkey")
    op.execute(
        """
        CREATE TABLE event_ids (
            key       bytea  NOT NULL,
            day       date   NOT NULL,
            position  bigint NOT NULL,
            PRIMARY KEY (key, day)
        ) PARTITION BY RANGE (day)
        """
    )
    op.execute(
        """
        CREATE TABLE idempotency_keys (
            signer          text        NOT NULL,
            key             text        NOT NULL,
            day             date        NOT NULL,
            first_position  bigint      NOT NULL,
            count           integer     NOT NULL,
            stream_id       text        NOT NULL,
            stream_version  integer     NOT NULL,
            digest          bytea       NOT NULL,
            recorded_at     timestamptz NOT NULL,
            PRIMARY KEY (signer, key, day)
        ) PARTITION BY RANGE (day)
        """
    )
    op.execute(
        f"""
        CREATE TEMP TABLE ids_0008 AS
        SELECT i.key, {_DAY} AS day, i.position
          FROM event_ids_0007 i JOIN events e ON e.position = i.position
         WHERE {_RECENT}
        """  # noqa: S608 -- constants only
    )
    op.execute(f"DELETE FROM ids_0008 WHERE day < {_HORIZON}")  # noqa: S608
    op.execute(
        f"""
        CREATE TEMP TABLE keys_0008 AS
        SELECT k.signer, k.key, {_DAY} AS day, k.first_position, k.count, k.stream_id,
               k.stream_version, k.digest, k.recorded_at
          FROM idempotency_keys_0007 k JOIN events e ON e.position = k.first_position
         WHERE {_RECENT}
        """  # noqa: S608 -- constants only
    )
    op.execute(f"DELETE FROM keys_0008 WHERE day < {_HORIZON}")  # noqa: S608
    _partitions_for("event_ids", "SELECT DISTINCT day FROM ids_0008")
    _partitions_for("idempotency_keys", "SELECT DISTINCT day FROM keys_0008")
    op.execute("INSERT INTO event_ids (key, day, position) SELECT key, day, position FROM ids_0008")
    op.execute("INSERT INTO idempotency_keys SELECT * FROM keys_0008")
    op.execute("DROP TABLE ids_0008, keys_0008, event_ids_0007, idempotency_keys_0007")


def downgrade() -> None:
    for table in ("event_ids", "idempotency_keys"):
        op.execute(f"ALTER TABLE {table} RENAME TO {table}_0008")
        op.execute(f"ALTER INDEX {table}_pkey RENAME TO {table}_0008_pkey")
    op.execute(
        """
        CREATE TABLE event_ids AS
        SELECT DISTINCT ON (key) key, position FROM event_ids_0008 ORDER BY key, position
        """
    )
    op.execute("ALTER TABLE event_ids ALTER COLUMN key SET NOT NULL")
    op.execute("ALTER TABLE event_ids ALTER COLUMN position SET NOT NULL")
    op.execute("ALTER TABLE event_ids ADD PRIMARY KEY (key)")
    op.execute(
        """
        CREATE TABLE idempotency_keys (
            key             text        NOT NULL,
            first_position  bigint      NOT NULL,
            count           integer     NOT NULL,
            stream_id       text        NOT NULL,
            stream_version  integer     NOT NULL,
            digest          bytea       NOT NULL,
            recorded_at     timestamptz NOT NULL,
            signer          text        NOT NULL DEFAULT '',
            PRIMARY KEY (signer, key)
        )
        """
    )
    op.execute(
        """
        INSERT INTO idempotency_keys
        SELECT DISTINCT ON (signer, key) key, first_position, count, stream_id,
               stream_version, digest, recorded_at, signer
          FROM idempotency_keys_0008 ORDER BY signer, key, first_position
        """
    )
    op.execute("DROP TABLE event_ids_0008")
    op.execute("DROP TABLE idempotency_keys_0008")
    op.execute(
        "CREATE INDEX event_ids_position_brin ON event_ids USING brin (position) "
        "WITH (autosummarize = on)"
    )
    op.execute(
        "CREATE INDEX idempotency_keys_position_brin ON idempotency_keys "
        "USING brin (first_position) WITH (autosummarize = on)"
    )
