"""Ledger tables: events (partitioned by day), head, streams, keys, checkpoints.

Revision ID: 0001_ledger
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0001_ledger"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE events (
            position        bigint      NOT NULL,
            recorded_at     timestamptz NOT NULL,
            stream_id       text        NOT NULL,
            stream_version  integer     NOT NULL,
            event_type      text        NOT NULL,
            actor           text        NOT NULL,
            subjects        text[]      NOT NULL,
            body            bytea       NOT NULL,
            signature       bytea       NOT NULL,
            prev_hash       bytea       NOT NULL,
            entry_hash      bytea       NOT NULL,
            PRIMARY KEY (position, recorded_at)
        ) PARTITION BY RANGE (recorded_at)
        """
    )
    op.execute("CREATE INDEX events_subjects_idx ON events USING gin (subjects)")
    op.execute("CREATE INDEX events_stream_idx ON events (stream_id, stream_version)")
    op.execute(
        """
        CREATE TABLE ledger_head (
            id          integer PRIMARY KEY CHECK (id = 1),
            position    bigint      NOT NULL,
            entry_hash  bytea       NOT NULL,
            recorded_at timestamptz NOT NULL
        )
        """
    )
    op.execute(
        "INSERT INTO ledger_head VALUES "
        "(1, 0, decode(repeat('00', 32), 'hex'), '1970-01-01T00:00:00Z')"
    )
    op.execute(
        """
        CREATE TABLE streams (
            stream_id     text PRIMARY KEY,
            version       integer NOT NULL,
            last_position bigint  NOT NULL
        )
        """
    )
    op.execute(
        """
        CREATE TABLE idempotency_keys (
            key             text PRIMARY KEY,
            first_position  bigint      NOT NULL,
            count           integer     NOT NULL,
            stream_id       text        NOT NULL,
            stream_version  integer     NOT NULL,
            digest          bytea       NOT NULL,
            recorded_at     timestamptz NOT NULL
        )
        """
    )
    op.execute(
        """
        CREATE TABLE agent_keys (
            did         text PRIMARY KEY,
            public_key  bytea  NOT NULL,
            position    bigint NOT NULL
        )
        """
    )
    op.execute(
        """
        CREATE TABLE checkpoints (
            position    bigint PRIMARY KEY,
            head_hash   bytea       NOT NULL,
            time        timestamptz NOT NULL,
            signer      text        NOT NULL,
            signature   bytea       NOT NULL
        )
        """
    )


def downgrade() -> None:
    for table in ("checkpoints", "agent_keys", "idempotency_keys", "streams", "ledger_head"):
        op.execute(f"DROP TABLE {table}")
    op.execute("DROP TABLE events")
